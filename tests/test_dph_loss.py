"""DPH-RL rehearsal loss (fdpo/losses/dph.py) against independent truth.

- value: the DPH-RL paper's per-sample forms written out here in float64 (docs/objectives.md §7);
- gradient: the expected gradient of the loss under exact enumeration of π_ref (one position and a
  two-token sequence over a small vocabulary) equals the autograd gradient of the exact
  D_f(π‖π_ref) = Σ_v π_ref f(π/π_ref) (times the DPH scale), summed directly in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpo.losses.dph import rehearsal_loss, rehearsal_scale

# The paper's per-sample forms (docs/objectives.md §7 and the §0 table), direct float64 on u.
ALPHA = 0.3


def dph_forward(u):
    return u - torch.log(u) - 1.0


def dph_js(u):
    return u * torch.log(u) - (u + 1.0) * torch.log((u + 1.0) / 2.0)


def dph_alpha(u, a=ALPHA):
    return (u ** (1.0 - a) - (1.0 - a) * u - a) / (a * (a - 1.0))


def dph_reverse(u):  # registry f̃ = u log u − (u − 1)
    return u * torch.log(u) - u + 1.0


# The exact divergences' generators (docs/objectives.md §0 table), for D_f = Σ q f(p/q).
EXACT = {
    "forward_kl": (lambda u: -torch.log(u), 1.0),
    "js": (lambda u: 0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)), 2.0),
    "alpha": (dph_alpha, 1.0),
    "reverse_kl": (lambda u: u * torch.log(u), 1.0),
}
FORMS = {"forward_kl": dph_forward, "js": dph_js, "alpha": dph_alpha, "reverse_kl": dph_reverse}


def _div(name):
    from fdpo.divergences import get_divergence

    return get_divergence(name, alpha=ALPHA) if name == "alpha" else get_divergence(name)


@pytest.mark.parametrize("name", list(FORMS))
def test_value_equals_paper_formula_in_float64(name):
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 3
    pol = ref + torch.randn(3, 7, generator=g, dtype=torch.float64) * 1.5
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    loss, metrics = rehearsal_loss(pol, ref, mask, _div(name))
    u = torch.exp(pol - ref)
    per = FORMS[name](u)
    want = (per * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    label = _div(name).label
    torch.testing.assert_close(metrics[f"div/{label}"], want / rehearsal_scale(_div(name)), rtol=1e-10, atol=1e-12)
    assert float(metrics["rehearsal/tokens"]) == mask.sum()
    # fp32 inputs give the same value to fp32 precision
    loss32, _ = rehearsal_loss(pol.float(), ref.float(), mask, _div(name))
    torch.testing.assert_close(loss32.double(), want, rtol=2e-5, atol=1e-6)


def test_padding_is_ignored_even_where_nonfinite():
    pol = torch.tensor([[-1.0, -2.0, float("nan")]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = rehearsal_loss(pol, ref, mask, "forward_kl")
    u = torch.exp(pol[0, :2].double() - ref[0, :2].double())
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(dph_forward(u).mean())) < 1e-6


def test_registry_convention_and_num_tokens():
    g = torch.Generator().manual_seed(1)
    ref = -torch.rand(2, 4, generator=g, dtype=torch.float64)
    pol = ref + 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 4)
    loss, _ = rehearsal_loss(pol, ref, mask, "forward_kl", convention="registry")
    torch.testing.assert_close(loss, (ref - pol).mean())
    loss_n, _ = rehearsal_loss(pol, ref, mask, "fkl", num_tokens=16)
    torch.testing.assert_close(loss_n, dph_forward(torch.exp(pol - ref)).sum() / 16)
    with pytest.raises(ValueError, match="convention"):
        rehearsal_loss(pol, ref, mask, "js", convention="verl")


def test_no_clamp_large_ratio_is_exact_and_finite_in_bf16():
    """verl clamps the forward term at 10; fdpo does not (docs/objectives.md §7)."""
    ref = torch.tensor([[-30.0, -3.0]], dtype=torch.float64)
    pol = torch.tensor([[-1.0, -60.0]], dtype=torch.float64)  # ℓ = +29 and −57
    mask = torch.ones(1, 2)
    loss, _ = rehearsal_loss(pol, ref, mask, "forward_kl")
    want = dph_forward(torch.exp(pol - ref)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert float(loss) > 1e11  # far above any clamp
    for dtype in (torch.float32, torch.bfloat16):
        big_pol = torch.tensor([[500.0, -500.0]], dtype=dtype, requires_grad=True)
        lo, _ = rehearsal_loss(big_pol, torch.zeros(1, 2, dtype=dtype), mask, "js")
        lo.backward()
        assert torch.isfinite(lo) and torch.isfinite(big_pol.grad).all()


def _exact_divergence(name, logp, logq):
    f, scale = EXACT[name]
    p, q = logp.exp(), logq.exp()
    return scale * (q * f(p / q)).sum(-1)


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha", "reverse_kl"])
def test_expected_gradient_one_position_equals_exact_divergence_gradient(name):
    """E_{a∼π_ref}[∇ loss(a)] = ∇ s_f·D_f(π‖π_ref), by enumeration over a 6-token vocabulary."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    logq = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    logp = theta.log_softmax(-1)
    q = logq.exp()
    expected = sum(
        q[a] * rehearsal_loss(logp[a].view(1, 1), logq[a].view(1, 1), torch.ones(1, 1), _div(name))[0]
        for a in range(6)
    )
    (grad,) = torch.autograd.grad(expected, theta, retain_graph=True)
    exact = _exact_divergence(name, logp, logq)
    (true_grad,) = torch.autograd.grad(exact, theta)
    torch.testing.assert_close(expected, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, true_grad, rtol=1e-9, atol=1e-12)
    assert float(true_grad.abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha"])
def test_expected_gradient_two_token_sequences_token_mean(name):
    """Sequences y1 y2 ∼ π_ref (vocab 3, second token conditioned on the first): the expected
    token-mean loss and its gradient equal ½ s_f [D_f at position 1 + E_{y1∼π_ref} D_f at position 2]."""
    V = 3
    g = torch.Generator().manual_seed(3)
    theta1 = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(V, V, generator=g, dtype=torch.float64, requires_grad=True)  # row = y1
    logq1 = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    logq2 = torch.randn(V, V, generator=g, dtype=torch.float64).log_softmax(-1)
    logp1, logp2 = theta1.log_softmax(-1), theta2.log_softmax(-1)
    expected = 0.0
    for y1 in range(V):
        for y2 in range(V):
            prob = logq1[y1].exp() * logq2[y1, y2].exp()
            pol = torch.stack([logp1[y1], logp2[y1, y2]]).view(1, 2)
            ref = torch.stack([logq1[y1], logq2[y1, y2]]).view(1, 2)
            expected = expected + prob * rehearsal_loss(pol, ref, torch.ones(1, 2), _div(name))[0]
    exact = 0.5 * (
        _exact_divergence(name, logp1, logq1)
        + (logq1.exp() * _exact_divergence(name, logp2, logq2)).sum()
    )
    grads = torch.autograd.grad(expected, (theta1, theta2), retain_graph=True)
    true_grads = torch.autograd.grad(exact, (theta1, theta2))
    torch.testing.assert_close(expected, exact, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, true_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_zero_at_reference_and_nonnegative():
    ref = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    for name in ("forward_kl", "js", "alpha", "reverse_kl", "squared_hellinger", "jeffreys"):
        div = _div(name)
        loss, _ = rehearsal_loss(ref.clone(), ref, torch.ones(1, 3), div)
        assert abs(float(loss)) < 1e-7
        pol = ref + torch.tensor([[1.0, -2.0, 0.5]])
        loss, _ = rehearsal_loss(pol, ref, torch.ones(1, 3), div)
        assert float(loss) > 0 and math.isfinite(float(loss))
