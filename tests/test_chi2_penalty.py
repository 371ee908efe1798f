"""Correlated-Proxies χ² penalty (fdpo.losses.chi2) against float64 R + 1/R − 2 written out directly."""

from __future__ import annotations

import math

import pytest
import torch

from fdpo.losses.chi2 import chi2_penalty


def direct(L: torch.Tensor) -> torch.Tensor:
    """Plain float64 mean of R + 1/R − 2, R = e^L (valid inside |L| ≤ 10)."""
    R = torch.exp(L.to(torch.float64))
    return (R + 1.0 / R - 2.0).mean()


def test_matches_direct_inside_and_gradient():
    L = torch.tensor([-9.5, -3.0, -0.7, 0.2, 1.5, 4.0, 9.9], dtype=torch.float64, requires_grad=True)
    pen, m = chi2_penalty(L)
    ref = direct(L)
    torch.testing.assert_close(pen, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(m["div/chi2_occupancy"], ref.detach(), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(pen, L)
    # d/dL mean(e^L + e^-L - 2) = (e^L - e^-L)/B, written out
    expected = (torch.exp(L.detach()) - torch.exp(-L.detach())) / L.numel()
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
    assert m["chi2/frac_linear"].item() == 0.0


def test_small_log_ratios_accurate_in_fp32():
    """Near L = 0, g ≈ L²; the fp32 value keeps its relative accuracy (R + 1/R − 2 in fp32 would give 0)."""
    L = torch.tensor([1e-4, -3e-4, 2e-3], dtype=torch.float32)
    pen, _ = chi2_penalty(L)
    exact = sum(2.0 * (math.cosh(x) - 1.0) for x in L.double().tolist()) / 3
    assert pen.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_c1_at_boundary(sign):
    c = 10.0
    x = torch.tensor([sign * (c - 1e-7), sign * (c + 1e-7)], dtype=torch.float64, requires_grad=True)
    from fdpo.losses.chi2 import chi2_terms

    y = chi2_terms(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert y[0].item() == pytest.approx(y[1].item(), rel=1e-6)  # step 2e-7 × slope 2.2e4
    assert g[0].item() == pytest.approx(g[1].item(), rel=1e-6)
    # the slope at the boundary is the exact derivative e^c − e^{−c} (sign-aware)
    assert g[1].item() == pytest.approx(sign * (math.exp(c) - math.exp(-c)), rel=1e-9)
    # beyond the boundary: linear continuation of the exact value
    far = chi2_terms(torch.tensor([sign * 15.0], dtype=torch.float64)).item()
    assert far == pytest.approx(
        math.exp(c) + math.exp(-c) - 2 + (math.exp(c) - math.exp(-c)) * 5.0, rel=1e-12
    )


def test_sqrt_option():
    L = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    pen, _ = chi2_penalty(L, sqrt=True)
    torch.testing.assert_close(pen, torch.sqrt(direct(L)), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(pen, L)
    expected = (torch.exp(L.detach()) - torch.exp(-L.detach())) / 3 / (2 * math.sqrt(direct(L).item()))
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-15)
    tiny = torch.tensor([1e-4, -1e-4], dtype=torch.float64, requires_grad=True)
    pen, _ = chi2_penalty(tiny, sqrt=True)
    assert pen.item() == pytest.approx(math.sqrt(1e-4))  # the floor
    (g,) = torch.autograd.grad(pen, tiny)
    assert torch.all(g == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sqrt", [False, True])
def test_finite_for_huge_log_ratios(dtype, sqrt):
    L = torch.tensor([1000.0, -1000.0, 0.0, 37.0], dtype=dtype, requires_grad=True)
    pen, m = chi2_penalty(L, sqrt=sqrt)
    (g,) = torch.autograd.grad(pen, L)
    assert torch.isfinite(pen) and torch.isfinite(g).all()
    assert g[0].item() > 0 > g[1].item()  # still pushes |L| down
    assert m["chi2/frac_linear"].item() == pytest.approx(0.75)


def test_bad_input():
    with pytest.raises(ValueError, match="seq_log_ratio"):
        chi2_penalty(torch.zeros(2, 3))
