"""`fdpo divergences` fits the terminal (80 columns, a pipe); `fdpo keys` prints help as argparse would."""

from __future__ import annotations

import io

import pytest
from rich.cells import cell_len
from rich.console import Console


def _render(width: int) -> list[str]:
    from fdpo.divergences.table import print_divergence_table

    out = io.StringIO()
    print_divergence_table(Console(file=out, width=width, force_terminal=False, color_system=None))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_divergence_table_fits_narrow_terminals_one_block_per_entry(width):
    from fdpo.divergences.table import divergence_table_rows

    lines = _render(width)
    assert max(cell_len(line) for line in lines) <= width
    rows = divergence_table_rows()
    heads = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert [r["name"] for r in rows] == [h for h in heads if h in {r["name"] for r in rows}]
    for row in rows:  # every short formula stays whole on one line, under its label
        assert any(line.strip() == f"f(u)           {row['f(u)']}".strip() for line in lines), row["name"]


def test_divergence_table_is_the_full_table_when_it_fits():
    from fdpo.divergences.table import divergence_table_rows

    lines = _render(400)
    assert max(cell_len(line) for line in lines) <= 400
    header = next(line for line in lines if "f-DPO valid" in line)
    assert "mass covering" in header and "aliases" in header  # one table, every column
    for row in divergence_table_rows():
        assert any(row["name"] in line and row["f(u)"] in line for line in lines)


def test_cli_divergences_piped_fits_80_columns(capsys, monkeypatch):
    """Under a pipe rich has no terminal to ask: the width is COLUMNS (80 when unset)."""
    from fdpo.cli import main

    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["divergences"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 20 and max(cell_len(line) for line in lines) <= 80


def test_cli_keys_unescapes_percent(capsys):
    from fdpo.cli import main

    assert main(["keys", "sft"]) == 0
    out = capsys.readouterr().out
    assert "%%" not in out
    line = next(line for line in out.splitlines() if line.startswith("torch_empty_cache_steps"))
    assert "~10% slower" in line  # TRL writes "~10%% slower" for argparse
