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


_TITLE = "fdpo divergences: D_f(π‖π_ref) = Σ_v π_ref(v) f(u), u = π/π_ref"
_CAPTION = (
    "α uses the f-DPO convention (TRL's f_alpha_divergence_coef = 1 − α); generalized_jsd's β weights π "
    "(TRL's beta = 1 − β). Names accept the aliases listed."
)
_BLOCK_FIELDS = ("f(u)", "f′(u)", "D_f(π‖π_ref)", "f-DPO valid", "mass covering", "parameters", "notes")


def print_divergence_table(console: Any = None) -> None:
    """Print the registry with ``rich`` (the ``fdpo divergences`` command), fitted to the console width.

    The full table when it fits whole; otherwise (an 80-column terminal, a pipe) one block per divergence,
    each field on its own line and long values wrapped at words under their field, so no cell is cut into
    fragments. A pipe gets rich's default width (80, or ``COLUMNS``).
    """
    from rich.console import Console

    console = console or Console()
    table = _rich_table()
    if Console(width=10_000).measure(table).maximum <= console.width:
        console.print(table)
    else:
        _print_blocks(console)


def _rich_table() -> Any:
    from rich.markup import escape
    from rich.table import Table

    columns = ("name", "aliases", *_COLUMNS[1:])
    table = Table(title=_TITLE, caption=_CAPTION, show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in divergence_table_rows():
        table.add_row(*(escape(row[c]) for c in columns))
    return table


def divergence_blocks(width: int) -> list[str]:
    """The registry as one block per divergence, every line at most `width` characters: the name (and
    aliases), then each field on its own line, long values wrapped at words under their field."""
    import textwrap

    label = max(len(f) for f in _BLOCK_FIELDS)
    indent = " " * (2 + label + 2)
    lines = [*textwrap.wrap(_TITLE, width)]
    for row in divergence_table_rows():
        lines.append("")
        aliases = "" if row["aliases"] == "—" else f"  (aliases: {row['aliases']})"
        lines += textwrap.wrap(row["name"] + aliases, width, subsequent_indent="    ")
        for field in _BLOCK_FIELDS:
            if row[field]:
                lines += textwrap.wrap(
                    row[field], width, initial_indent=f"  {field:<{label}}  ", subsequent_indent=indent,
                    break_on_hyphens=False,
                )
    lines += ["", *textwrap.wrap(_CAPTION, width)]
    return lines


def _print_blocks(console: Any) -> None:
    from rich.text import Text

    names = {row["name"] for row in divergence_table_rows()}
    for line in divergence_blocks(console.width):
        style = "bold" if line.split(" ", 1)[0] in names and not line.startswith(" ") else None
        console.print(Text(line, style=style or ""), soft_wrap=True)
