"""DisCO loss (fdpo.losses.disco) against a plain float64 implementation written here from docs/objectives.md §8.

The reference below loops over questions and completions with Python lists and computes the L-ratio as
a literal mean of probability ratios; the library uses masked log-sum-exps on (Q, G) tensors.
Gradients: torch.autograd.gradcheck (finite differences) on the library, and autograd of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpo.losses.disco import disco_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_disco(
    logp,
    mask,
    rewards,
    G,
    old=None,
    score="log_l",
    form="dro",
    tau=None,
    delta=1e-4,
    beta=1e3,
    kl="k1",
    thr=0.5,
):
    """Direct DisCO: loops over questions, literal means; returns (loss, objective, kl_hat)."""
    if tau is None:
        tau = 10.0 if score == "log_l" else 1.0
    B, T = logp.shape
    if old is None:
        old = logp.detach()
    scores = []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t] > 0]
        if score == "log_l":
            scores.append(sum(logp[b, t] for t in toks) / len(toks))
        else:
            scores.append(sum(torch.exp(logp[b, t]) / torch.exp(old[b, t]) for t in toks) / len(toks))
    Q = B // G
    total = torch.zeros((), dtype=torch.float64)
    for q in range(Q):
        pos = [scores[q * G + i] for i in range(G) if rewards[q * G + i] > thr]
        neg = [scores[q * G + i] for i in range(G) if not rewards[q * G + i] > thr]
        if not pos or not neg:
            continue
        pos_mean = sum(pos) / len(pos)
        if form == "basic":
            neg_term = sum(neg) / len(neg)
        else:
            neg_term = tau * torch.log(sum(torch.exp(x / tau) for x in neg) / len(neg))
        total = total + pos_mean - neg_term
    objective = total / Q
    num = torch.zeros((), dtype=torch.float64)
    cnt = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t] > 0:
                d = old[b, t] - logp[b, t]
                r = torch.exp(logp[b, t]) / torch.exp(old[b, t])
                num = num + (d if kl == "k1" else r - 1 - torch.log(r))
                cnt += 1
    kl_hat = num / cnt
    hinge = kl_hat - delta if kl_hat > delta else kl_hat * 0.0
    loss = -objective + 0.5 * beta * hinge**2
    return loss, objective, kl_hat


def make_batch(seed, Q=4, G=4, T=5, old_scale=0.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(Q * G, T, generator=g, dtype=torch.float64) * 3 - 0.05
    mask = torch.ones(Q * G, T, dtype=torch.float64)
    for b in range(Q * G):  # ragged lengths, at least one token
        n = int(torch.randint(1, T + 1, (1,), generator=g))
        mask[b, n:] = 0
    old = logp + old_scale * torch.randn(Q * G, T, generator=g, dtype=torch.float64)
    # question 0 mixed, 1 all positive, 2 all negative, 3 mixed (when Q = 4)
    rewards = torch.zeros(Q * G, dtype=torch.float64)
    rewards[0:2] = 1.0
    rewards[G : 2 * G] = 1.0
    if Q > 3:
        rewards[3 * G + 1] = 1.0
    return logp, mask, rewards, old


CASES = [(s, f) for s in ("log_l", "l_ratio") for f in ("dro", "basic")]


@pytest.mark.parametrize("score,form", CASES)
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_matches_direct_value_and_gradient(score, form, kl):
    logp, mask, rewards, old = make_batch(0, old_scale=0.05)
    x = logp.clone().requires_grad_(True)
    loss, metrics = disco_loss(
        x, mask, rewards, 4, old_token_logps=old, score=score, form=form, kl_estimator=kl
    )
    y = logp.clone().requires_grad_(True)
    ref_loss, ref_obj, ref_kl = reference_disco(y, mask, rewards, 4, old=old, score=score, form=form, kl=kl)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["disco/objective"], ref_obj.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["disco/kl"], ref_kl.detach(), rtol=1e-12, atol=1e-12)
    assert metrics["disco/groups_used"].item() == 2 and metrics["disco/groups_total"].item() == 4
    (g,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(ref_loss, y)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    # padding gets no gradient; the all-positive / all-negative questions only through the KL term
    assert torch.all(g[mask == 0] == 0)


@pytest.mark.parametrize("score,form", CASES)
def test_gradcheck_finite_differences(score, form):
    logp, mask, rewards, old = make_batch(1, Q=3, G=3, T=4, old_scale=0.03)
    rewards = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float64)

    def fn(x):
        return disco_loss(
            x, mask, rewards, 3, old_token_logps=old, score=score, form=form, kl_estimator="k3"
        )[0]

    assert torch.autograd.gradcheck(fn, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_tau_default_and_explicit():
    logp, mask, rewards, old = make_batch(2, old_scale=0.01)
    for score, tau in (("log_l", 10.0), ("l_ratio", 1.0)):
        a = disco_loss(logp, mask, rewards, 4, old_token_logps=old, score=score)[0]
        b = disco_loss(logp, mask, rewards, 4, old_token_logps=old, score=score, tau=tau)[0]
        c = disco_loss(logp, mask, rewards, 4, old_token_logps=old, score=score, tau=tau * 3)[0]
        assert a.item() == b.item() and a.item() != c.item()
        r = reference_disco(logp, mask, rewards, 4, old=old, score=score, tau=tau * 3)[0]
        torch.testing.assert_close(c, r, rtol=1e-12, atol=1e-12)


def test_no_usable_groups_gives_zero_objective():
    logp, mask, _, _ = make_batch(3)
    for rewards in (torch.ones(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)):
        x = logp.clone().requires_grad_(True)
        loss, m = disco_loss(x, mask, rewards, 4)
        assert loss.item() == 0.0 and m["disco/groups_used"].item() == 0
        (g,) = torch.autograd.grad(loss, x)
        assert torch.all(g == 0) and torch.isfinite(g).all()


def test_on_policy_default_old():
    """old=None: π_old = sg(π): KL̂ = 0, L-ratio scores are 1 with gradient of mean_t log π."""
    logp, mask, rewards, _ = make_batch(4)
    x = logp.clone().requires_grad_(True)
    loss, m = disco_loss(x, mask, rewards, 4, score="l_ratio", form="basic")
    assert m["disco/kl"].item() == 0.0 and m["disco/constraint_active"].item() == 0.0
    assert abs(m["disco/objective"].item()) < 1e-15  # every score is exactly 1
    (g,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(disco_loss(y, mask, rewards, 4, score="log_l", form="basic")[0], y)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_constraint_switches_on(kl):
    """Below δ the loss is −J exactly (penalty and its gradient 0); above, (β/2)(KL̂−δ)² and its gradient."""
    logp, mask, rewards, _ = make_batch(5)
    m = mask.bool()
    # old = logp + c on every token: k1 KL̂ = c; k3 KL̂ = e^{-c} - 1 + c
    for c, active in ((1e-5, False), (0.05, True)):
        old = logp + c
        x = logp.clone().requires_grad_(True)
        loss, met = disco_loss(x, mask, rewards, 4, old_token_logps=old, kl_estimator=kl)
        expected_kl = c if kl == "k1" else math.exp(-c) - 1 + c
        assert met["disco/kl"].item() == pytest.approx(expected_kl, rel=1e-9)
        assert met["disco/constraint_active"].item() == float(active)
        y = logp.clone().requires_grad_(True)
        obj_only = -reference_disco(y, mask, rewards, 4, old=old, beta=0.0)[1]
        (g,) = torch.autograd.grad(loss, x)
        (g_obj,) = torch.autograd.grad(obj_only, y)
        if not active:
            assert met["disco/penalty"].item() == 0.0
            torch.testing.assert_close(g, g_obj, rtol=1e-12, atol=1e-14)
        else:
            excess = expected_kl - 1e-4
            assert met["disco/penalty"].item() == pytest.approx(0.5 * 1e3 * excess**2, rel=1e-9)
            # d penalty / d logp_t = β·excess·dKL̂/dlogp_t, dKL̂/dlogp_t = −1/N (k1) or (r − 1)/N (k3)
            n = m.sum().item()
            dkl = (
                torch.full_like(logp, -1.0 / n)
                if kl == "k1"
                else (math.exp(-c) - 1.0) / n * torch.ones_like(logp)
            )
            expected_g = g_obj + 1e3 * excess * dkl * mask
            torch.testing.assert_close(g, expected_g, rtol=1e-10, atol=1e-12)


def test_objective_is_true_value_not_surrogate():
    """The logged objective equals J computed directly (not a straight-through value)."""
    logp, mask, rewards, old = make_batch(6, old_scale=0.02)
    _, m = disco_loss(logp, mask, rewards, 4, old_token_logps=old, score="l_ratio", form="dro", tau=0.5)
    _, obj, _ = reference_disco(logp, mask, rewards, 4, old=old, score="l_ratio", form="dro", tau=0.5)
    assert m["disco/objective"].item() == pytest.approx(obj.item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [1000.0, -1000.0])
def test_finite_for_extreme_log_ratios(dtype, shift):
    """Token log-ratios log π − log π_old = ±1000: loss, metrics and gradients finite, hinge active."""
    logp, mask, rewards, _ = make_batch(7)
    old = logp - shift
    for score in ("log_l", "l_ratio"):
        for kl in ("k1", "k3"):
            x = logp.to(dtype).requires_grad_(True)
            loss, met = disco_loss(
                x, mask, rewards, 4, old_token_logps=old.to(dtype), score=score, kl_estimator=kl
            )
            (g,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(g).all() and loss.dtype == torch.float32
            assert all(math.isfinite(v.item()) for v in met.values())
            if kl == "k3" or shift < 0:
                assert met["disco/constraint_active"].item() == 1.0


def test_ratio_continuation_is_c1():
    """Beyond r = 1e10 the L-ratio and k3 continue linearly: value and slope continuous at the switch."""
    from fdpo.losses.disco import LOG_RATIO_CAP, _exp_capped, _k3_capped

    c = LOG_RATIO_CAP
    for fn, exact in ((_exp_capped, math.exp), (_k3_capped, lambda y: math.expm1(y) - y)):
        x = torch.tensor([c - 1e-7, c + 1e-7, c - 3.0], dtype=torch.float64, requires_grad=True)
        y = fn(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert y[0].item() == pytest.approx(y[1].item(), rel=1e-6)
        assert g[0].item() == pytest.approx(g[1].item(), rel=1e-6)
        assert y[2].item() == pytest.approx(exact(c - 3.0), rel=1e-12)


def test_padding_values_are_ignored():
    """−inf / NaN in padded positions change nothing (value or gradient)."""
    logp, mask, rewards, old = make_batch(9, old_scale=0.05)
    dirty, dirty_old = logp.clone(), old.clone()
    dirty[mask == 0] = -math.inf
    dirty_old[mask == 0] = math.nan
    for score in ("log_l", "l_ratio"):
        for kl in ("k1", "k3"):
            x, y = logp.clone().requires_grad_(True), dirty.clone().requires_grad_(True)
            a = disco_loss(x, mask, rewards, 4, old_token_logps=old, score=score, kl_estimator=kl)[0]
            b = disco_loss(y, mask, rewards, 4, old_token_logps=dirty_old, score=score, kl_estimator=kl)[0]
            assert a.item() == b.item()
            (ga,), (gb,) = torch.autograd.grad(a, x), torch.autograd.grad(b, y)
            assert torch.equal(ga, gb)


def test_bad_inputs():
    logp, mask, rewards, _ = make_batch(8)
    with pytest.raises(ValueError, match="multiple of group_size"):
        disco_loss(logp, mask, rewards, 5)
    with pytest.raises(ValueError, match="score"):
        disco_loss(logp, mask, rewards, 4, score="logl")
    with pytest.raises(ValueError, match="form"):
        disco_loss(logp, mask, rewards, 4, form="x")
    with pytest.raises(ValueError, match="kl_estimator"):
        disco_loss(logp, mask, rewards, 4, old_token_logps=logp, kl_estimator="k2")
