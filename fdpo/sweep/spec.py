"""A sweep recipe: shared stages run once, then a grid of recipe overrides × seeds, each cell an ordinary run.

    description: DPH-RL vs GRPO on the testbed
    run_dir: runs/sweeps/dph_rl
    shared:                        # `fdpo pipeline` stages, run once into run_dir/shared/<name>
      - {name: model, kind: tiny, task: sum_pairs}
      - {name: data, kind: data, task: sum_pairs}
      - {name: sft, kind: train, recipe: recipes/tiny/sft.yaml, overrides: {...}}
    start: {from_stage: sft}       # the RL start: evaluated as the row "start", and the KL-to-start reference
    base:                          # the recipe every cell trains; {from_stage: X} is a shared stage's output
      recipe: recipes/tiny/grpo_none.yaml
      overrides: {model_name_or_path: {from_stage: sft}, dataset_name: {from_stage: data, file: rl.jsonl}}
    methods:                       # named methods: each sets several recipe keys at once (optional)
      grpo: {}
      reverse_kl: {divergence: reverse_kl, divergence_coef: 0.05, estimator: k3_ratio}
    grid:                          # optional: the cartesian product of these recipe keys' values
      learning_rate: [1.0e-3, 3.0e-4]
    seeds: [0, 1, 2]               # set as the recipe key `seed` (or `seed_key`)
    baseline: grpo                 # paired differences are against this method
    eval: {task: sum_pairs, splits: [eval, ood], num_samples: 64, num_prompts: 62, temperature: 1.0, seed: 1234}
    launcher: {kind: local}        # or {kind: submitit, cluster: local | slurm, accelerate_config: FILE, ...}

A cell is (method, grid point, seed); its name is `<method>[-<key>=<value>…]-s<seed>`, e.g.
`reverse_kl-learning_rate=0.001-s0`. Each cell is the folder run_dir/cells/<name> holding
`recipe.yaml` (the base recipe with every override applied; `fdpo train cells/<name>/recipe.yaml
--resume` continues it by hand), `cell.yaml` (a 1-train + evals pipeline that `fdpo pipeline` runs),
the run directory `train/` and one `eval_<split>/eval.json` per split.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdpo.errors import RecipeError, nearest
from fdpo.pipeline import _references, _resolve, parse_pipeline, stage_is_complete
from fdpo.recipe.load import read_yaml

TOP_KEYS = ("description", "run_dir", "shared", "start", "base", "methods", "grid", "seeds", "seed_key",
            "baseline", "eval", "launcher")
EVAL_KEYS = ("task", "splits", "num_samples", "num_prompts", "temperature", "max_new_tokens", "seed", "ks")
LAUNCHER_KEYS = ("kind", "cluster", "folder", "accelerate_config", "timeout_min", "slurm")
LAUNCHERS = ("local", "submitit")
START_ROW = "start"
CELL_PIPELINE = "cell.yaml"
DEFAULT_SPLITS = ("eval",)
_SAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a method, a grid point and a seed."""

    method: str
    point: tuple[tuple[str, Any], ...]
    seed: int
    overrides: dict[str, Any] = field(hash=False, compare=False)

    @property
    def name(self) -> str:
        return cell_name(self.method, self.point, self.seed)

    @property
    def group(self) -> str:
        """The cell's row in the report: its name without the seed."""
        return cell_name(self.method, self.point, None)


@dataclass
class SweepSpec:
    path: Path
    description: str
    run_dir: Path
    shared: list[dict[str, Any]]
    start: Any
    base_recipe: Path
    base_overrides: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    seeds: list[int]
    seed_key: str
    baseline: str | None
    eval: dict[str, Any]
    launcher: dict[str, Any]

    @property
    def shared_dir(self) -> Path:
        return self.run_dir / "shared"

    def cell_dir(self, cell: Cell) -> Path:
        return self.run_dir / "cells" / cell.name

    def cells(self) -> list[Cell]:
        """Every cell: methods (in file order) × grid points (cartesian, in key order) × seeds."""
        keys = list(self.grid)
        points = [tuple(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        out = []
        for method, method_overrides in self.methods.items():
            for point in points:
                for seed in self.seeds:
                    overrides = {**self.base_overrides, **method_overrides, **dict(point), self.seed_key: seed}
                    out.append(Cell(method, point, seed, overrides))
        return out

    def groups(self) -> list[str]:
        seen: dict[str, None] = {}
        for cell in self.cells():
            seen.setdefault(cell.group, None)
        return list(seen)


def _value_label(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)
    return _SAFE.sub("_", text)


def cell_name(method: str, point: tuple[tuple[str, Any], ...], seed: int | None) -> str:
    """`<method>[-<key>=<value>…][-s<seed>]`, characters outside [A-Za-z0-9_.=+-] replaced by '_'."""
    parts = [_SAFE.sub("_", method)] + [f"{_SAFE.sub('_', k)}={_value_label(v)}" for k, v in point]
    if seed is not None:
        parts.append(f"s{seed}")
    return "-".join(parts)


def _check_keys(where: str, given: dict[str, Any], valid: tuple[str, ...]) -> None:
    for key in given:
        if key not in valid:
            hint = nearest(str(key), valid)
            raise RecipeError(f"{where}: unknown key '{key}'." + (f" Did you mean '{hint}'?" if hint
                                                                     else f" Valid: {list(valid)}."))


def parse_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep recipe (see the module docstring); every error names the file and key."""
    path = Path(path)
    data = read_yaml(path)
    _check_keys(str(path), data, TOP_KEYS)
    for key in ("run_dir", "base"):
        if key not in data:
            raise RecipeError(f"{path}: a sweep needs '{key}' (see `fdpo sweep --help`).")
    base = data["base"]
    if not isinstance(base, dict) or "recipe" not in base:
        raise RecipeError(f"{path}: 'base' is a mapping with 'recipe' (a training recipe) and optional 'overrides'.")
    _check_keys(f"{path}: base", base, ("recipe", "overrides"))
    shared = data.get("shared") or []
    if not isinstance(shared, list):
        raise RecipeError(f"{path}: 'shared' is a list of pipeline stages (as in `fdpo pipeline`).")
    stage_names = [str(s.get("name")) for s in shared if isinstance(s, dict)]
    methods = data.get("methods") or {"base": {}}
    if not isinstance(methods, dict) or not all(isinstance(v, dict | type(None)) for v in methods.values()):
        raise RecipeError(f"{path}: 'methods' maps a method name to the recipe keys it sets, e.g. "
                          "'reverse_kl: {divergence: reverse_kl, divergence_coef: 0.05}'.")
    methods = {str(k): dict(v or {}) for k, v in methods.items()}
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise RecipeError(f"{path}: 'grid' maps a recipe key to a non-empty list of values, e.g. "
                          "'divergence: [reverse_kl, forward_kl, js, alpha(0.5)]'.")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise RecipeError(f"{path}: 'seeds' is a list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}.")
    baseline = data.get("baseline")
    spec = SweepSpec(
        path=path,
        description=str(data.get("description", "")),
        run_dir=Path(data["run_dir"]),
        shared=[dict(s) for s in shared],
        start=data.get("start"),
        base_recipe=Path(base["recipe"]),
        base_overrides=dict(base.get("overrides") or {}),
        methods=methods,
        grid={str(k): list(v) for k, v in grid.items()},
        seeds=list(seeds),
        seed_key=str(data.get("seed_key", "seed")),
        baseline=None if baseline is None else str(baseline),
        eval=dict(data.get("eval") or {}),
        launcher=dict(data.get("launcher") or {"kind": "local"}),
    )
    _check_keys(f"{path}: eval", spec.eval, EVAL_KEYS)
    _check_keys(f"{path}: launcher", spec.launcher, LAUNCHER_KEYS)
    if spec.launcher.get("kind", "local") not in LAUNCHERS:
        raise RecipeError(f"{path}: launcher kind {spec.launcher.get('kind')!r} is not one of {list(LAUNCHERS)}.")
    if not spec.base_recipe.is_file():
        raise RecipeError(f"{path}: base recipe {spec.base_recipe} does not exist.")
    groups = spec.groups()
    if baseline is not None and baseline not in groups:
        hint = nearest(baseline, groups)
        raise RecipeError(f"{path}: baseline '{baseline}' is not a method of this sweep ({groups})."
                          + (f" Did you mean '{hint}'?" if hint else ""))
    for ref in _references([spec.start, spec.base_overrides, methods, grid]):
        if ref not in stage_names:
            raise RecipeError(f"{path}: from_stage '{ref}' is not a shared stage (shared: {stage_names}).")
    names = [c.name for c in spec.cells()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RecipeError(f"{path}: two cells share the name '{dup}'; give the methods or grid values distinct names.")
    return spec


def resolve_shared(value: Any, spec: SweepSpec) -> Any:
    """Replace {from_stage: X, file: F} by the path of shared stage X's output (joined with F)."""
    return _resolve(value, {str(s["name"]): spec.shared_dir / str(s["name"]) for s in spec.shared})


def eval_splits(spec: SweepSpec) -> list[str]:
    """The evaluation splits of the sweep (`eval.splits`; default: the held-out prompts only)."""
    return [str(s) for s in spec.eval.get("splits", DEFAULT_SPLITS)]


def cell_is_complete(spec: SweepSpec, cell: Cell) -> bool:
    """Every stage of the cell's pipeline (training, each split's evaluation) is complete."""
    pipeline = spec.cell_dir(cell) / CELL_PIPELINE
    if not pipeline.is_file():
        return False
    _, stages = parse_pipeline(pipeline)
    return all(stage_is_complete(s) for s in stages)
