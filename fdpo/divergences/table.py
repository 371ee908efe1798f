"""The registry as a table: rows for docs and logs, markdown, and the ``fdpo divergences`` printout."""

from __future__ import annotations

from typing import Any

from fdpo.divergences.registry import _ENTRIES, divergence_aliases


def _params_text(specs: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, spec in specs.items():
        lo, hi = spec.get("range", (None, None))
        rng = f" ∈ ({lo:g}, {hi:g})" if lo is not None else ""
        parts.append(f"{name}{rng}" + ("" if spec["required"] else " (optional)"))
    return ", ".join(parts) or "—"


def divergence_table_rows() -> list[dict[str, str]]:
    """One dict per registered divergence: name, aliases, f(u), f′(u), D_f equals, f-DPO valid,
    mass covering, parameters, notes."""
    aliases: dict[str, list[str]] = {}
    for alias, canonical in divergence_aliases().items():
        if alias != canonical:
            aliases.setdefault(canonical, []).append(alias)
    rows = []
    for name, cls in _ENTRIES.items():
        specs = cls.parameter_specs()
        rows.append(
            {
                "name": name,
                "aliases": ", ".join(sorted(aliases.get(name, []))) or "—",
                "f(u)": cls.formula,
                "f′(u)": cls.f_prime_formula,
                "D_f(π‖π_ref)": cls.equals,
                "f-DPO valid": "yes" if cls.f_dpo_valid else "no",
                "mass covering": "yes" if cls.mass_covering else "no",
                "parameters": _params_text(specs),
                "notes": "; ".join(filter(None, [cls.notes] + [s.get("help", "") for s in specs.values()])),
            }
        )
    return rows


_COLUMNS = ("name", "f(u)", "f′(u)", "D_f(π‖π_ref)", "f-DPO valid", "mass covering", "parameters")


def format_divergence_table(columns: tuple[str, ...] = _COLUMNS) -> str:
    """The registry as a GitHub-markdown table (u = π/π_ref, D_f(π‖π_ref) = Σ π_ref f(u))."""
    rows = divergence_table_rows()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def print_divergence_table(console: Any = None) -> None:
    """Print the registry with ``rich`` (the ``fdpo divergences`` command)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(
        title="fdpo divergences: D_f(π‖π_ref) = Σ_v π_ref(v) f(u), u = π/π_ref",
        caption="α uses the f-DPO convention (TRL's f_alpha_divergence_coef = 1 − α); "
        "generalized_jsd's β weights π (TRL's beta = 1 − β). Names accept the aliases listed.",
        show_lines=False,
    )
    for col in ("name", "aliases", *_COLUMNS[1:]):
        table.add_column(col, overflow="fold")
    for row in divergence_table_rows():
        table.add_row(*(escape(row[c]) for c in ("name", "aliases", *_COLUMNS[1:])))
    console.print(table)
