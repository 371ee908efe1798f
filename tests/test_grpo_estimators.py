"""GRPO penalty estimators as FGRPOTrainer uses them: expected gradient == autograd of the claimed divergence.

Truth: the exact divergences written here from their definitions (float64), differentiated by autograd.
Expectations over rollouts are computed EXACTLY by enumerating a small vocabulary (single token) or
all two-token sequences, with the sampling distribution held fixed (samples are not differentiated).
"""

from __future__ import annotations

import pytest
import torch

from fdpo.divergences import full_vocab_divergence_from_hidden
from fdpo.losses.grpo_penalty import (
    ESTIMATORS,
    check_estimator,
    group_advantages,
    per_token_penalty,
    sequence_k1,
)

V = 6


def _rkl(p, q):
    return (p * (p / q).log()).sum(-1)


def _fkl(p, q):
    return (q * (q / p).log()).sum(-1)


def _js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def _hellinger(p, q):
    return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)


def _alpha(a):
    # f(u) = (u^{1-α} − (1−α)u − α) / (α(α−1)), D = Σ q f(p/q)
    def d(p, q):
        u = p / q
        return (q * (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))).sum(-1)

    return d


EXACT = {"reverse_kl": _rkl, "forward_kl": _fkl, "js": _js, "squared_hellinger": _hellinger, "alpha(0.5)": _alpha(0.5)}

# (estimator, divergence given, exact divergence whose gradient it must follow)
CLAIMS = [
    ("k2", "reverse_kl", _rkl),
    ("k3", "reverse_kl", _fkl),  # k3 as a loss follows the FORWARD-KL gradient
    ("k3_ratio", "reverse_kl", _rkl),
    ("k3_plus", "reverse_kl", _rkl),  # k3's value, k2's gradient
    *[("generator", name, fn) for name, fn in EXACT.items()],
]


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = (1.3 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref_logp = (1.3 * torch.randn(V, generator=g, dtype=torch.float64)).log_softmax(-1)
    old_logp = (theta.detach() + 0.6 * torch.randn(V, generator=g, dtype=torch.float64)).log_softmax(-1)
    return theta, ref_logp, old_logp


def _grad(value, theta):
    (g,) = torch.autograd.grad(value, theta, retain_graph=True)
    return g


@pytest.mark.parametrize("estimator,divergence,exact", CLAIMS, ids=[f"{e}-{d}" for e, d, _ in CLAIMS])
def test_on_policy_expected_gradient_single_token(estimator, divergence, exact):
    theta, ref_logp, _ = _toy()
    logp = theta.log_softmax(-1)
    per_token = per_token_penalty(estimator, divergence, logp, ref_logp, None)  # on-policy: old = sg(logp)
    expected_grad = _grad((logp.exp().detach() * per_token).sum(), theta)
    truth = _grad(exact(logp.exp(), ref_logp.exp()), theta)
    torch.testing.assert_close(expected_grad, truth, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "estimator,divergence,exact",
    [c for c in CLAIMS if c[0] in ("k3_ratio", "generator")],
    ids=[f"{e}-{d}" for e, d, _ in CLAIMS if e in ("k3_ratio", "generator")],
)
def test_off_policy_expected_gradient_and_value(estimator, divergence, exact):
    """Rollouts from π_old ≠ π (num_iterations > 1): the importance ratio keeps value and gradient exact."""
    theta, ref_logp, old_logp = _toy(1)
    logp = theta.log_softmax(-1)
    per_token = per_token_penalty(estimator, divergence, logp, ref_logp, old_logp)
    value = (old_logp.exp() * per_token).sum()
    d = exact(logp.exp(), ref_logp.exp())
    torch.testing.assert_close(value.detach(), d.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_grad(value, theta), _grad(d, theta), rtol=1e-9, atol=1e-12)


def test_k3_gradient_is_not_reverse_kl():
    """The test above can fail: k3's expected gradient differs from ∇KL(π‖π_ref) on this toy."""
    theta, ref_logp, _ = _toy()
    logp = theta.log_softmax(-1)
    g = _grad((logp.exp().detach() * per_token_penalty("k3", "reverse_kl", logp, ref_logp)).sum(), theta)
    assert (g - _grad(_rkl(logp.exp(), ref_logp.exp()), theta)).abs().max() > 1e-2


def test_k3_plus_has_k3s_value_per_token_and_is_unbiased():
    """k3⁺ per token is k3 exactly (≥ 0), so E_π[k3⁺] = KL(π‖π_ref) by enumeration; its gradient (above) is k2's."""
    theta, ref_logp, _ = _toy(2)
    logp = theta.log_softmax(-1)
    plus = per_token_penalty("k3_plus", "reverse_kl", logp, ref_logp)
    k3 = per_token_penalty("k3", "reverse_kl", logp, ref_logp)
    torch.testing.assert_close(plus, k3, rtol=0, atol=0)
    assert bool((plus >= 0).all())
    value = (logp.exp() * plus).sum()
    torch.testing.assert_close(value, _rkl(logp.exp(), ref_logp.exp()), rtol=1e-9, atol=1e-12)
    g_plus = _grad(plus.sum(), theta)
    g_k2 = _grad(per_token_penalty("k2", "reverse_kl", logp, ref_logp).sum(), theta)
    torch.testing.assert_close(g_plus, g_k2, rtol=1e-12, atol=1e-14)  # per sample, not only in expectation


def test_k1_reward_follows_reverse_kl_through_the_policy_gradient():
    """Reward r = −η·k1 (PPO-RLHF): E_π[−A ∇log π] with A = r − b equals η∇KL(π‖π_ref) for any constant b.

    The trainer computes the sequence k1 with `sequence_k1` (from π_old's log-probs, detached), subtracts
    η·k1 from the reward and forms the group advantage; here the group is the exact distribution.
    """
    theta, ref_logp, _ = _toy(2)
    eta = 0.3
    logp = theta.log_softmax(-1)
    k1 = sequence_k1(logp.detach()[:, None], ref_logp[:, None], torch.ones(V, 1, dtype=torch.float64))
    reward = -eta * k1.double()
    p = logp.exp().detach()
    for baseline in (0.0, float((p * reward).sum())):
        surrogate = -((reward - baseline) * logp * p).sum()
        torch.testing.assert_close(
            _grad(surrogate, theta), eta * _grad(_rkl(logp.exp(), ref_logp.exp()), theta), rtol=1e-9, atol=1e-12
        )
    # k1 as a LOSS regularises nothing in expectation: why the trainer folds it into the reward
    as_loss = (p * (logp - ref_logp)).sum()
    assert _grad(as_loss, theta).abs().max() < 1e-12


@pytest.mark.parametrize("estimator,divergence,exact", CLAIMS, ids=[f"{e}-{d}" for e, d, _ in CLAIMS])
def test_two_token_sequences_per_position_gradient(estimator, divergence, exact):
    """Sequences y = (a1, a2), a2 | a1 tabular. The trainer sums the per-token penalty over positions; its
    expected gradient is Σ_t E_{prefix∼π}[∇ D(π(·|prefix) ‖ π_ref(·|prefix))] with the prefix law held fixed
    (the per-position convention of TRL's k3), checked by enumerating all V² sequences."""
    g = torch.Generator().manual_seed(3)
    th1 = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    th2 = torch.randn(V, V, generator=g, dtype=torch.float64).requires_grad_(True)
    r1 = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)
    r2 = torch.randn(V, V, generator=g, dtype=torch.float64).log_softmax(-1)
    l1, l2 = th1.log_softmax(-1), th2.log_softmax(-1)
    a1, a2 = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    logp = torch.stack([l1[a1], l2[a1, a2]], -1).reshape(-1, 2)
    ref = torch.stack([r1[a1], r2[a1, a2]], -1).reshape(-1, 2)
    seq_prob = (logp.sum(-1)).exp().detach()
    mask = torch.ones_like(logp)
    penalty = (per_token_penalty(estimator, divergence, logp, ref, None) * mask).sum(-1)
    value = (seq_prob * penalty).sum()
    p1 = l1.exp().detach()
    truth = exact(l1.exp(), r1.exp()) + (p1 * exact(l2.exp(), r2.exp())).sum()
    got = torch.autograd.grad(value, (th1, th2), retain_graph=True)
    want = torch.autograd.grad(truth, (th1, th2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "forward_kl"])
def test_full_vocab_weighted_sum_as_the_trainer_calls_it(divergence):
    """η Σ_{b,t} w_bt D_f(π_bt ‖ π_ref,bt) from hidden states + LM heads (reduction='sum', weights, mask,
    temperature), value and gradient vs the direct float64 computation."""
    g = torch.Generator().manual_seed(4)
    B, T, H, T_ = 2, 3, 5, 0.7
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = mask.double() / mask.sum()
    got = full_vocab_divergence_from_hidden(
        hidden, weight, ref_hidden, ref_weight, divergence, mask, temperature=T_, reduction="sum", weights=w
    )
    p = ((hidden @ weight.T) / T_).softmax(-1)
    q = ((ref_hidden @ ref_weight.T) / T_).softmax(-1)
    truth = (w * EXACT[divergence](p, q)).sum()
    torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-12)
    ga = torch.autograd.grad(got, (hidden, weight), retain_graph=True)
    gb = torch.autograd.grad(truth, (hidden, weight))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_group_advantages_match_the_direct_formula():
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.2, float("nan")])
    got = group_advantages(r, 4, "group")
    for g in range(2):
        x = r[4 * g : 4 * g + 4]
        ok = ~torch.isnan(x)
        m = x[ok].mean()
        s = x[ok].std()  # Bessel-corrected, as TRL
        want = torch.where(ok, (x - m) / (s + 1e-4), torch.zeros_like(x))
        torch.testing.assert_close(got[4 * g : 4 * g + 4], want)
    torch.testing.assert_close(group_advantages(r[:4], 4, "none"), r[:4] - r[:4].mean())


@pytest.mark.parametrize(
    "estimator,divergence,fragment",
    [
        ("k4", "reverse_kl", "key 'estimator'"),
        ("k3", "js", "key 'divergence'"),
        ("k2", "forward_kl", "estimates the reverse KL only"),
        ("k1_reward", "alpha(0.5)", "key 'estimator'"),
    ],
)
def test_bad_estimator_divergence_combinations_name_the_key(estimator, divergence, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_estimator(estimator, divergence)


def test_every_estimator_is_documented():
    assert set(ESTIMATORS) == {"k1_reward", "k2", "k3", "k3_ratio", "k3_plus", "generator", "full_vocab"}
    for name in ESTIMATORS:
        check_estimator(name, "reverse_kl")
    for name in ("generator", "full_vocab"):
        check_estimator(name, "js")
