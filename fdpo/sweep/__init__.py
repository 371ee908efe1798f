"""`fdpo sweep`: a grid of recipe overrides × seeds over shared stages, each cell an ordinary run, with a report."""

from fdpo.sweep.run import plan, run_sweep
from fdpo.sweep.spec import Cell, SweepSpec, cell_name, parse_sweep

__all__ = ["Cell", "SweepSpec", "cell_name", "parse_sweep", "plan", "run_sweep"]
