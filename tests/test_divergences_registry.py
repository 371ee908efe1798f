"""The registry: names, aliases, parameters and their validation, labels, the table."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from truth import CASES, case_id

from fdpo.divergences import (
    Alpha,
    GeneralizedJSD,
    available_divergences,
    divergence_table_rows,
    format_divergence_table,
    get_divergence,
    print_divergence_table,
)

REQUIRED = [
    "reverse_kl",
    "forward_kl",
    "js",
    "alpha",
    "jeffreys",
    "squared_hellinger",
    "neyman_chi2",
    "pearson_chi2",
    "total_variation",
]


def test_every_required_entry_is_registered_in_order():
    names = available_divergences()
    assert names[: len(REQUIRED)] == REQUIRED
    assert "generalized_jsd" in names


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("kl", "reverse_kl"),
        ("rkl", "reverse_kl"),
        ("fkl", "forward_kl"),
        ("jsd", "js"),
        ("hellinger", "squared_hellinger"),
        ("chi2", "pearson_chi2"),
        ("neyman", "neyman_chi2"),
        ("tv", "total_variation"),
        ("Reverse-KL", "reverse_kl"),
        ("  Total Variation ", "total_variation"),
        ("gjsd(0.3)", "generalized_jsd"),
    ],
)
def test_aliases_resolve_to_one_canonical_name(alias, canonical):
    div = get_divergence(alias)
    assert div.canonical == canonical
    assert div.label.split("(")[0] == canonical


def test_unknown_name_lists_valid_names_and_the_nearest_match():
    with pytest.raises(ValueError) as err:
        get_divergence("revrse_kl")
    msg = str(err.value)
    assert "Did you mean 'reverse_kl'" in msg
    for name in REQUIRED:
        assert name in msg
    with pytest.raises(ValueError, match="Did you mean 'js'"):
        get_divergence("jss")


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_alpha_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="alpha") as err:
        get_divergence("alpha", alpha=bad)
    if bad in (0.0, 1.0, 1.5, -0.1):
        assert "(0, 1)" in str(err.value)


def test_missing_unknown_and_misplaced_parameters():
    with pytest.raises(ValueError, match="needs the parameter 'alpha'"):
        get_divergence("alpha")
    with pytest.raises(ValueError, match="Did you mean 'alpha'"):
        get_divergence("alpha", alpah=0.5)
    with pytest.raises(ValueError, match=r"has no parameter 'beta'.*Accepted parameters: none"):
        get_divergence("js", beta=0.3)
    with pytest.raises(ValueError, match="must be a number"):
        get_divergence("alpha", alpha="half")
    with pytest.raises(ValueError, match="given twice"):
        get_divergence("alpha(0.5)", alpha=0.3)
    with pytest.raises(ValueError, match="together with a built divergence"):
        get_divergence(get_divergence("js"), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        get_divergence("generalized_jsd", beta=1.0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_labels_round_trip_and_entries_are_frozen_values(case):
    name, params = case
    div = get_divergence(name, **params)
    assert get_divergence(div.label) == div
    assert get_divergence(div) is div
    assert hash(div) == hash(get_divergence(name, **params))
    assert div.params == {k: float(v) for k, v in params.items()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        div.alpha = 0.3  # type: ignore[misc]
    for attr in ("formula", "f_prime_formula", "equals", "canonical"):
        assert isinstance(getattr(div, attr), str) and getattr(div, attr)
    assert isinstance(div.f_dpo_valid, bool) and isinstance(div.mass_covering, bool)


def test_label_format():
    assert get_divergence("alpha", alpha=0.5).label == "alpha(0.5)"
    assert get_divergence("kl").label == "reverse_kl"
    assert get_divergence("alpha(alpha=0.25)").alpha == 0.25


def test_alpha_convention_against_trls_formula():
    """TRL ≥ 0.29: f′(u) = (u^{a−1} − 1)/(a − 1) with a = f_alpha_divergence_coef; fdpo's α = 1 − a."""
    a = 0.3
    div = Alpha.from_trl_coef(a)
    assert div.alpha == pytest.approx(0.7)
    u = torch.logspace(-2, 2, 9, dtype=torch.float64)
    torch.testing.assert_close(div.f_prime(u.log()), (u ** (a - 1) - 1) / (a - 1))
    assert GeneralizedJSD.from_trl_beta(0.2).beta == pytest.approx(0.8)


def test_flags_match_the_objectives_table():
    expected = {
        "reverse_kl": (True, False),
        "forward_kl": (True, True),
        "js": (True, True),
        "alpha": (True, True),
        "jeffreys": (True, True),
        "squared_hellinger": (True, True),
        "neyman_chi2": (True, True),
        "pearson_chi2": (False, False),
        "total_variation": (False, True),
    }
    for name, (valid, covering) in expected.items():
        div = get_divergence(name, **({"alpha": 0.5} if name == "alpha" else {}))
        assert (div.f_dpo_valid, div.mass_covering) == (valid, covering), name


def test_table_rows_markdown_and_rich_printout():
    rows = divergence_table_rows()
    assert [r["name"] for r in rows] == available_divergences()
    row = {r["name"]: r for r in rows}
    assert row["reverse_kl"]["f(u)"] == "u log u" and row["pearson_chi2"]["f-DPO valid"] == "no"
    assert "alpha ∈ (0, 1)" in row["alpha"]["parameters"]
    assert "chi2" in row["pearson_chi2"]["aliases"]
    md = format_divergence_table()
    assert md.count("\n") == len(rows) + 1 and "| name |" in md
    from rich.console import Console

    buf = io.StringIO()
    print_divergence_table(Console(file=buf, width=200))
    text = buf.getvalue()
    for name in available_divergences():
        assert name in text
    assert "½[u log u" in text  # formulas with brackets are not eaten as rich markup
