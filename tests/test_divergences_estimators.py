"""Sample estimators: value and EXPECTED GRADIENT against the exact divergence, by enumeration.

A per-token estimator used as a loss on samples a ∼ S (S held fixed, samples not differentiated)
has expected gradient Σ_a S(a) ∇_θ loss(a; θ) with S(a) detached; that is computed exactly here by
summing over a small vocabulary and compared with the autograd gradient of the exact divergence
(written in this file from the definitions), which is the truth. A Monte Carlo test with real
samples checks the same for k3 and k3 × ratio within stated standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from truth import CASES, case_id, divergence_by_generator

from fdpo.divergences import (
    get_divergence,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_importance_weighted,
    policy_sample_generator_loss,
    ref_sample_generator_loss,
)

V = 7


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = (1.5 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref_logits = 1.5 * torch.randn(V, generator=g, dtype=torch.float64)
    old_logits = theta.detach() + 0.7 * torch.randn(V, generator=g, dtype=torch.float64)
    return theta, ref_logits.log_softmax(-1), old_logits.log_softmax(-1)


def _exact(divergence_of_p_q, theta, logq):
    """(value, ∇_θ) of an exact divergence D(π_θ, π_ref)."""
    p = theta.softmax(-1)
    d = divergence_of_p_q(p, logq.exp())
    (grad,) = torch.autograd.grad(d, theta)
    return float(d.detach()), grad


def _expected(per_token_loss, sampling_probs, theta):
    """(E_S[loss], E_S[∇_θ loss]) by enumeration, S detached."""
    losses = per_token_loss(theta.log_softmax(-1))
    weights = sampling_probs.detach()
    value = (weights * losses).sum()
    (grad,) = torch.autograd.grad(value, theta)
    return float(value.detach()), grad


def _rkl(p, q):
    return (p * (p.log() - q.log())).sum()


def _fkl(p, q):
    return (q * (q.log() - p.log())).sum()


def _close(a, b, tol=1e-10):
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=tol, abs=tol)
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_k1_is_unbiased_for_reverse_kl_and_its_expected_gradient_is_zero():
    theta, logq, _ = _setup(1)
    value, grad = _expected(lambda lp: kl_k1(lp, logq), theta.softmax(-1), theta)
    true_value, _ = _exact(_rkl, theta, logq)
    _close(value, true_value)
    _close(grad, torch.zeros_like(grad))


def test_k2_expected_gradient_is_the_reverse_kl_gradient():
    theta, logq, _ = _setup(2)
    value, grad = _expected(lambda lp: kl_k2(lp, logq), theta.softmax(-1), theta)
    true_value, true_grad = _exact(_rkl, theta, logq)
    _close(grad, true_grad)
    assert value > 0 and abs(value - true_value) > 1e-3  # biased (value is not the KL)


def test_k3_estimates_reverse_kl_but_its_gradient_is_the_forward_kl_gradient():
    theta, logq, _ = _setup(3)
    value, grad = _expected(lambda lp: kl_k3(lp, logq), theta.softmax(-1), theta)
    rkl_value, rkl_grad = _exact(_rkl, theta, logq)
    _, fkl_grad = _exact(_fkl, theta, logq)
    _close(value, rkl_value)
    _close(grad, fkl_grad)
    assert float((grad - rkl_grad).abs().max()) > 1e-2  # it really is not the reverse-KL gradient


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_k3_times_importance_ratio_follows_the_reverse_kl_gradient(on_policy):
    theta, logq, old = _setup(4)
    if on_policy:
        old = theta.detach().log_softmax(-1)
    value, grad = _expected(lambda lp: kl_k3_importance_weighted(lp, logq, old), old.exp(), theta)
    rkl_value, rkl_grad = _exact(_rkl, theta, logq)
    _close(value, rkl_value)
    _close(grad, rkl_grad)


@pytest.mark.parametrize("normalized", [True, False], ids=["f_normalized", "f"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rehearsal_generator_on_reference_samples_is_exact_in_value_and_gradient(case, normalized):
    name, params = case
    theta, logq, _ = _setup(5)
    div = get_divergence(name, **params)
    value, grad = _expected(
        lambda lp: ref_sample_generator_loss(lp, logq, div, normalized=normalized), logq.exp(), theta
    )
    true_value, true_grad = _exact(lambda p, q: divergence_by_generator(name, params, p, q), theta, logq)
    _close(value, true_value)
    _close(grad, true_grad)


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_policy_sample_generator_is_exact_in_value_and_gradient(case, on_policy):
    name, params = case
    theta, logq, old = _setup(6)
    if on_policy:
        old = theta.detach().log_softmax(-1)
    div = get_divergence(name, **params)
    true_value, true_grad = _exact(lambda p, q: divergence_by_generator(name, params, p, q), theta, logq)
    for normalized in (True, False):
        old_arg = None if on_policy else old
        value, grad = _expected(
            lambda lp, n=normalized, o=old_arg: policy_sample_generator_loss(
                lp, logq, div, old_logp=o, normalized=n
            ),
            old.exp(),
            theta,
        )
        _close(value, true_value)
        _close(grad, true_grad)


def test_policy_sample_generator_without_score_term_is_k1_or_k3():
    theta, logq, _ = _setup(7)
    lp = theta.log_softmax(-1)
    plain = policy_sample_generator_loss(lp, logq, "reverse_kl", normalized=False, score_function=False)
    normalized = policy_sample_generator_loss(lp, logq, "reverse_kl", normalized=True, score_function=False)
    _close(plain, kl_k1(lp, logq))
    _close(normalized, kl_k3(lp, logq))
    _close(kl_k3_importance_weighted(lp, logq, lp.detach()), kl_k3(lp, logq))  # ratio is 1 in value
    # without the score term the expected gradient is NOT ∇D_f for a generic f (here JS)
    _, grad = _expected(
        lambda x: policy_sample_generator_loss(x, logq, "js", score_function=False), lp.exp(), theta
    )
    _, true_grad = _exact(lambda p, q: divergence_by_generator("js", {}, p, q), theta, logq)
    assert float((grad - true_grad).abs().max()) > 1e-3


def test_monte_carlo_mean_gradient_of_k3_and_k3_ratio():
    """Real samples: the mean gradient over N draws equals Σ_a (count_a/N) ∇loss_a. Each coordinate is
    within 5 standard errors (per-sample gradient std by enumeration / √N) of the claimed truth."""
    theta, logq, _ = _setup(8)
    p = theta.softmax(-1).detach()
    n = 100_000
    counts = torch.bincount(
        torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0)), minlength=V
    )
    freq = counts.double() / n
    _, rkl_grad = _exact(_rkl, theta, logq)
    _, fkl_grad = _exact(_fkl, theta, logq)
    for loss_fn, truth, wrong in (
        (lambda lp: kl_k3(lp, logq), fkl_grad, rkl_grad),
        (lambda lp: kl_k3_importance_weighted(lp, logq, lp.detach()), rkl_grad, fkl_grad),
    ):
        per_token = torch.stack(
            [torch.autograd.grad(loss_fn(theta.log_softmax(-1))[a], theta)[0] for a in range(V)]
        )  # (V tokens, V parameters)
        mc_mean = (freq[:, None] * per_token).sum(0)
        exact_mean = (p[:, None] * per_token).sum(0)
        se = ((p[:, None] * (per_token - exact_mean) ** 2).sum(0) / n).sqrt()
        assert bool(((mc_mean - truth).abs() <= 5 * se + 1e-12).all()), (mc_mean, truth, se)
        assert bool(((mc_mean - wrong).abs() > 5 * se).any())


def test_estimators_at_extreme_log_ratios_are_finite_with_finite_gradients():
    logp = torch.tensor([-1000.0, -80.0, -1e-3, 0.0, 5.0, 60.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, -900.0, -0.5])
    old = torch.tensor([0.0, -500.0, 0.0, 0.0, -300.0, 0.0])
    outs = [
        kl_k1(logp, ref),
        kl_k2(logp, ref),
        kl_k3(logp, ref),
        kl_k3_importance_weighted(logp, ref, old),
        ref_sample_generator_loss(logp, ref, "forward_kl"),
        ref_sample_generator_loss(logp, ref, "js", normalized=False),
        policy_sample_generator_loss(logp, ref, "alpha(0.3)", old_logp=old),
        policy_sample_generator_loss(logp, ref, "neyman_chi2"),
    ]
    for out in outs:
        (g,) = torch.autograd.grad(out.sum(), logp)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(g).all())
    assert float(kl_k3(logp, ref)[2].detach()) == pytest.approx(math.exp(1e-3) - 1 - 1e-3, rel=1e-4)


def test_half_precision_inputs_give_float32_values():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.bfloat16)
    assert kl_k3(lp, ref).dtype == torch.float32
    assert ref_sample_generator_loss(lp, ref, "js").dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        kl_k3(lp, ref[:1])
