"""Exact values against independent truth: direct summation over small categoricals, torch's and
scipy's own divergences, closed forms for Gaussians (Monte Carlo), and the defining properties."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch.distributions import Categorical, MultivariateNormal, kl_divergence
from truth import CASES, MpOps, case_id, divergence_by_generator, generator

from fdpo.divergences import available_divergences, full_vocab_divergence, get_divergence


def _categoricals(seed: int = 0, rows: int = 6, vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Random strictly positive categoricals (float64), some flat, some peaked, one pair nearly equal."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 1.0, 3.0, 6.0, 1.0, 2.0], dtype=torch.float64)[:rows, None]
    zp = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    zq = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    zq[4] = zp[4] + 1e-3 * torch.randn(vocab, generator=g, dtype=torch.float64)
    return zp.softmax(-1), zq.softmax(-1)


def _by_elementwise_f(div, p, q):
    return (q * div.f(p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_divergence_equals_its_definition_by_direct_summation(case):
    name, params = case
    div = get_divergence(name, **params)
    for seed in range(3):
        p, q = _categoricals(seed)
        truth = divergence_by_generator(name, params, p, q)
        full = full_vocab_divergence(p.log(), q.log(), div)
        elementwise = _by_elementwise_f(div, p, q)
        torch.testing.assert_close(full, truth, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(elementwise, truth, rtol=1e-10, atol=1e-13)


def test_reverse_and_forward_kl_match_torch_distributions():
    p, q = _categoricals(1)
    kl_pq = kl_divergence(Categorical(probs=p), Categorical(probs=q))  # KL(π ‖ π_ref)
    kl_qp = kl_divergence(Categorical(probs=q), Categorical(probs=p))  # KL(π_ref ‖ π)
    torch.testing.assert_close(
        full_vocab_divergence(p.log(), q.log(), "reverse_kl"), kl_pq, rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(
        full_vocab_divergence(p.log(), q.log(), "forward_kl"), kl_qp, rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(full_vocab_divergence(p.log(), q.log(), "kl"), kl_pq, rtol=1e-10, atol=1e-13)


def test_js_matches_scipy_jensenshannon_squared():
    p, q = _categoricals(2)
    expected = torch.tensor(
        [jensenshannon(a.numpy(), b.numpy()) ** 2 for a, b in zip(p, q)], dtype=torch.float64
    )
    for name in ("js", "generalized_jsd(0.5)"):
        torch.testing.assert_close(
            full_vocab_divergence(p.log(), q.log(), name), expected, rtol=1e-8, atol=1e-12
        )
    assert bool((expected <= math.log(2)).all())


def test_squared_hellinger_is_two_minus_twice_the_bhattacharyya_coefficient():
    p, q = _categoricals(3)
    expected = 2 * (1 - (p * q).sqrt().sum(-1))
    torch.testing.assert_close(
        full_vocab_divergence(p.log(), q.log(), "hellinger"), expected, rtol=1e-10, atol=1e-13
    )
    # α = ½ is twice the squared Hellinger distance
    torch.testing.assert_close(
        full_vocab_divergence(p.log(), q.log(), "alpha(0.5)"), 2 * expected, rtol=1e-10, atol=1e-13
    )


def test_total_variation_and_chi2_closed_forms():
    p, q = _categoricals(4)
    torch.testing.assert_close(full_vocab_divergence(p.log(), q.log(), "tv"), 0.5 * (p - q).abs().sum(-1))
    torch.testing.assert_close(full_vocab_divergence(p.log(), q.log(), "chi2"), ((p - q) ** 2 / q).sum(-1))
    torch.testing.assert_close(
        full_vocab_divergence(p.log(), q.log(), "neyman_chi2"), ((p - q) ** 2 / p).sum(-1)
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonnegative_and_zero_exactly_when_equal(case):
    name, params = case
    div = get_divergence(name, **params)
    p, q = _categoricals(5)
    d = full_vocab_divergence(p.log(), q.log(), div)
    assert bool((d > 0).all()), d
    same = full_vocab_divergence(p.log(), p.log(), div)
    assert float(same.abs().max()) < 1e-14
    # a shift of the logits is the same distribution
    assert float(full_vocab_divergence(p.log() + 3.0, p.log(), div).abs().max()) < 1e-12


def test_alpha_limits_reach_reverse_and_forward_kl():
    p, q = _categoricals(6)
    rkl = kl_divergence(Categorical(probs=p), Categorical(probs=q))
    fkl = kl_divergence(Categorical(probs=q), Categorical(probs=p))
    for eps in (1e-3, 1e-5):
        near0 = full_vocab_divergence(p.log(), q.log(), get_divergence("alpha", alpha=eps))
        near1 = full_vocab_divergence(p.log(), q.log(), get_divergence("alpha", alpha=1 - eps))
        torch.testing.assert_close(near0, rkl, rtol=20 * eps, atol=1e-12)
        torch.testing.assert_close(near1, fkl, rtol=20 * eps, atol=1e-12)
        # per element too: f_α(u) → u log u − u + 1 and u − 1 − log u
        logr = torch.linspace(-5, 5, 101, dtype=torch.float64)
        u = logr.exp()
        torch.testing.assert_close(
            get_divergence("alpha", alpha=eps).f(logr), u * logr - u + 1, rtol=30 * eps, atol=1e-12
        )
        torch.testing.assert_close(
            get_divergence("alpha", alpha=1 - eps).f(logr), u - 1 - logr, rtol=30 * eps, atol=1e-12
        )


def test_jeffreys_is_the_sum_of_both_kls_and_js_is_generalized_jsd_half():
    p, q = _categoricals(7)
    rkl = full_vocab_divergence(p.log(), q.log(), "reverse_kl")
    fkl = full_vocab_divergence(p.log(), q.log(), "forward_kl")
    torch.testing.assert_close(full_vocab_divergence(p.log(), q.log(), "jeffreys"), rkl + fkl)
    logr = torch.linspace(-30, 30, 121, dtype=torch.float64)
    torch.testing.assert_close(
        get_divergence("js").f(logr), get_divergence("generalized_jsd", beta=0.5).f(logr)
    )


def test_generalized_jsd_is_beta_kl_to_the_mixture():
    p, q = _categoricals(8)
    for beta in (0.1, 0.5, 0.8):
        m = beta * p + (1 - beta) * q
        expected = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        got = full_vocab_divergence(p.log(), q.log(), get_divergence("gjsd", beta=beta))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_generator_identities_and_f_prime_is_the_derivative_of_f(case):
    name, params = case
    div = get_divergence(name, **params)
    zero = torch.zeros(3, dtype=torch.float64)
    assert float(div.f(zero).abs().max()) == 0.0 and float(div.f_normalized(zero).abs().max()) == 0.0
    u = torch.cat([torch.logspace(-3, 3, 40, dtype=torch.float64)]).requires_grad_(True)
    u = u[(u - 1).abs() > 1e-3].detach().requires_grad_(True)  # TV has a kink at 1
    fu = div.f(u.log())
    (df_du,) = torch.autograd.grad(fu.sum(), u)
    torch.testing.assert_close(df_du, div.f_prime(u.log()).detach(), rtol=1e-9, atol=1e-12)
    ref_f, ref_fp, _ = generator(name, params)
    uu = u.detach()
    torch.testing.assert_close(fu.detach(), ref_f(uu), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(div.f_prime(uu.log()), ref_fp(uu), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(div.f_over_u(uu.log()), ref_f(uu) / uu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(div.u_f_prime(uu.log()), uu * ref_fp(uu), rtol=1e-10, atol=1e-12)
    c = float(ref_fp(torch.tensor(1.0, dtype=torch.float64)))
    normalized = ref_f(uu) - c * (uu - 1)
    torch.testing.assert_close(div.f_normalized(uu.log()), normalized, rtol=1e-10, atol=1e-12)
    assert bool((div.f_normalized(uu.log()) >= 0).all())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flags_agree_with_the_generator(case):
    """f_dpo_valid ⇔ f′ strictly increasing with f′(0⁺) = −∞; mass_covering ⇔ not (f*(0) = ∞ and
    f(0⁺) < ∞), the limits computed with mpmath from the reference generator."""
    name, params = case
    div = get_divergence(name, **params)
    mp.mp.dps = 50
    f, fp, fpp = generator(name, params, MpOps)
    tiny, huge = mp.mpf("1e-5000"), mp.mpf("1e5000")
    f_dpo = fp(tiny) < -1e3 and all(fpp(mp.mpf(u)) > 0 for u in ("1e-6", "0.1", "1", "10", "1e6"))
    assert div.f_dpo_valid == f_dpo
    zero_avoiding = f(tiny) > 1e3
    zero_forcing = f(huge) / huge > 1e3
    assert div.mass_covering == (zero_avoiding or not zero_forcing)


def test_every_registered_entry_is_covered_by_the_cases():
    assert {name for name, _ in CASES} == set(available_divergences())


# ------------------------------------------------------------------------------- Gaussians


def _gaussians() -> tuple[MultivariateNormal, MultivariateNormal]:
    """π = P, π_ref = Q: two 3-D Gaussians close enough for low-variance importance weights."""
    mu_p = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    mu_q = torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.2, 0.0], [0.2, 0.9, 0.1], [0.0, 0.1, 1.1]], dtype=torch.float64)
    b = torch.tensor([[1.1, -0.1, 0.05], [-0.1, 1.0, 0.0], [0.05, 0.0, 0.95]], dtype=torch.float64)
    return MultivariateNormal(mu_p, a), MultivariateNormal(mu_q, b)


def _closed_form_kl(p: MultivariateNormal, q: MultivariateNormal) -> float:
    """docs/objectives.md §0: ½[tr(Σ2⁻¹Σ1) + (μ2−μ1)ᵀΣ2⁻¹(μ2−μ1) − n + log(det Σ2 / det Σ1)]."""
    s1, s2 = p.covariance_matrix, q.covariance_matrix
    d = q.loc - p.loc
    s2i = torch.linalg.inv(s2)
    n = s1.shape[0]
    return float(0.5 * (torch.trace(s2i @ s1) + d @ s2i @ d - n + torch.logdet(s2) - torch.logdet(s1)))


def _closed_form_bhattacharyya(p: MultivariateNormal, q: MultivariateNormal) -> float:
    s1, s2 = p.covariance_matrix, q.covariance_matrix
    s = (s1 + s2) / 2
    d = p.loc - q.loc
    return float(
        d @ torch.linalg.inv(s) @ d / 8
        + 0.5 * (torch.logdet(s) - 0.5 * (torch.logdet(s1) + torch.logdet(s2)))
    )


def _mc(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def test_monte_carlo_gaussian_divergences_converge_to_closed_forms():
    """D_f(P‖Q) = E_Q[f(e^ℓ)] = E_P[f(e^ℓ)/e^ℓ], ℓ = log p(x) − log q(x), with the registry's f.
    200k samples, fixed seed; each estimate within 4 standard errors (and the standard errors small)."""
    torch.manual_seed(1234)
    p, q = _gaussians()
    kl_pq, kl_qp = _closed_form_kl(p, q), _closed_form_kl(q, p)
    # the closed form itself agrees with torch.distributions
    assert math.isclose(kl_pq, float(kl_divergence(p, q)), rel_tol=1e-10)
    hell = 2 * (1 - math.exp(-_closed_form_bhattacharyya(p, q)))
    n = 200_000
    xq, xp = q.sample((n,)), p.sample((n,))
    lq = p.log_prob(xq) - q.log_prob(xq)  # ℓ at samples of π_ref = Q
    lp = p.log_prob(xp) - q.log_prob(xp)  # ℓ at samples of π = P
    rkl, fkl, hel = (get_divergence(x) for x in ("reverse_kl", "forward_kl", "squared_hellinger"))
    checks = [
        ("KL(P‖Q) on Q samples, f", rkl.f_normalized(lq), kl_pq),
        ("KL(P‖Q) on P samples, f/u", rkl.f_over_u(lp), kl_pq),
        ("KL(P‖Q) on P samples, k3", rkl.f_normalized_over_u(lp), kl_pq),
        ("KL(Q‖P) on Q samples, f", fkl.f(lq), kl_qp),
        ("KL(Q‖P) on P samples, f/u", fkl.f_normalized_over_u(lp), kl_qp),
        ("H² on Q samples", hel.f(lq), hell),
        ("H² on P samples", hel.f_over_u(lp), hell),
    ]
    for label, values, truth in checks:
        est, se = _mc(values)
        assert se < 0.03 * truth, (label, se, truth)
        assert abs(est - truth) < 4 * se, (label, est, truth, se)
