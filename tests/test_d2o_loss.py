"""D2O loss (fdpo.losses.d2o) against the formula of docs/objectives.md §5 written out in float64 here."""

from __future__ import annotations

import math

import pytest
import torch

from fdpo.losses.d2o import d2o_loss


def direct(pol_s, pol_l, ref_s, ref_l, beta, alpha):
    """Per-prompt −log σ(z) with z = (β/K) Σ_k ℓ_k − α ℓ_l, by loops and the plain logistic function."""
    out = []
    for i in range(pol_s.shape[0]):
        K = pol_s.shape[1]
        s = sum(pol_s[i, k] - ref_s[i, k] for k in range(K))
        z = beta / K * s - alpha * (pol_l[i] - ref_l[i])
        out.append(-torch.log(1.0 / (1.0 + torch.exp(-z))))
    return torch.stack(out)


def _data(seed, B=5, K=4, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    pol_s = -torch.rand(B, K, generator=g, dtype=torch.float64) * scale
    ref_s = -torch.rand(B, K, generator=g, dtype=torch.float64) * scale
    pol_l = -torch.rand(B, generator=g, dtype=torch.float64) * scale
    ref_l = -torch.rand(B, generator=g, dtype=torch.float64) * scale
    return pol_s, pol_l, ref_s, ref_l


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.1), (1.0, 0.3), (0.05, 2.0)])
def test_value_and_gradient_match_direct(beta, alpha):
    pol_s, pol_l, ref_s, ref_l = _data(0)
    a, b = pol_s.clone().requires_grad_(True), pol_l.clone().requires_grad_(True)
    loss, m = d2o_loss(a, b, ref_s, ref_l, beta=beta, alpha=alpha)
    c, d = pol_s.clone().requires_grad_(True), pol_l.clone().requires_grad_(True)
    ref = direct(c, d, ref_s, ref_l, beta, alpha)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    ga = torch.autograd.grad(loss.sum(), (a, b))
    gr = torch.autograd.grad(ref.sum(), (c, d))
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(m["d2o/rejected_logratio"], pol_l - ref_l)
    torch.testing.assert_close(m["d2o/samples_logratio"], (pol_s - ref_s).mean(1))
    # the gradient pushes the samples up and the negative down
    assert (ga[0] < 0).all() and (ga[1] > 0).all()


def test_reference_is_not_differentiated():
    pol_s, pol_l, ref_s, ref_l = _data(1)
    rs, rl = ref_s.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    loss, _ = d2o_loss(pol_s, pol_l, rs, rl)
    assert not loss.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stable_for_log_ratios_of_1000(dtype, sign):
    """|ℓ| = 1000 (β = α = 1 so |z| = 2000): finite loss, the exact limits of loss and gradient."""
    B, K = 3, 4
    pol_s = torch.full((B, K), -5.0, dtype=dtype, requires_grad=True)
    ref_s = torch.full((B, K), -5.0 - sign * 1000.0, dtype=dtype)
    pol_l = torch.full((B,), -5.0, dtype=dtype, requires_grad=True)
    ref_l = torch.full((B,), -5.0 + sign * 1000.0, dtype=dtype)
    loss, _ = d2o_loss(pol_s, pol_l, ref_s, ref_l, beta=1.0, alpha=1.0)
    g_s, g_l = torch.autograd.grad(loss.sum(), (pol_s, pol_l))
    assert torch.isfinite(loss).all() and torch.isfinite(g_s).all() and torch.isfinite(g_l).all()
    if sign > 0:  # z = +2000: loss 0, gradient 0
        assert loss.abs().max().item() == 0.0 and g_l.abs().max().item() == 0.0
    else:  # z = −2000: loss = −z = 2000, dL/dℓ_l = α, dL/dℓ_k = −β/K
        torch.testing.assert_close(loss, torch.full((B,), 2000.0), rtol=1e-6, atol=0)
        torch.testing.assert_close(g_l.float(), torch.ones(B))
        torch.testing.assert_close(g_s.float(), torch.full((B, K), -1.0 / K))


def test_moderate_fp32_matches_float64():
    pol_s, pol_l, ref_s, ref_l = _data(2, scale=300.0)
    l32, _ = d2o_loss(pol_s.float(), pol_l.float(), ref_s.float(), ref_l.float())
    l64 = direct(pol_s, pol_l, ref_s, ref_l, 0.1, 0.1)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-4)
    assert math.isfinite(l32.sum().item())


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        d2o_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        d2o_loss(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2), torch.zeros(3))
