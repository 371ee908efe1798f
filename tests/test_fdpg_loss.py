"""f-DPG loss (fdpo.losses.fdpg) against exact gradients on a small discrete space.

Truth: π = softmax(θ) over 6 outcomes, a target P (unnormalised) and a proposal q with rational
probabilities c_x/N. Repeating outcome x c_x times makes the batch mean EXACTLY the expectation
under q, so autograd of the loss on that batch is the expected f-DPG gradient, which must equal the
autograd gradient of D_f(π‖p) = Σ_x p(x) f(π(x)/p(x)) with f written here in u-space (docs/objectives.md §0).
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpo.losses.fdpg import FDPGState, fdpg_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


F_U = {  # name: (registry name, params, f(u))
    "reverse_kl": ("reverse_kl", {}, lambda u: u * torch.log(u)),
    "forward_kl": ("forward_kl", {}, lambda u: -torch.log(u)),
    "js": ("js", {}, lambda u: 0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2))),
    "alpha0.3": ("alpha", {"alpha": 0.3}, lambda u: (u**0.7 - 0.7 * u - 0.3) / (0.3 * (0.3 - 1))),
    "squared_hellinger": ("squared_hellinger", {}, lambda u: (torch.sqrt(u) - 1) ** 2),
    "neyman_chi2": ("neyman_chi2", {}, lambda u: (1 - u) ** 2 / u),
}

COUNTS = torch.tensor([1, 2, 3, 2, 1, 3])  # q = COUNTS / 12


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    log_P = torch.randn(6, generator=g, dtype=torch.float64) * 1.5 + 2.0  # unnormalised target
    q = COUNTS.double() / COUNTS.sum()
    samples = torch.repeat_interleave(torch.arange(6), COUNTS)
    return theta, log_P, q, samples


def _get(name):
    from fdpo.divergences import get_divergence

    reg, params, f = F_U[name]
    return get_divergence(reg, **params), f


@pytest.mark.parametrize("name", list(F_U))
@pytest.mark.parametrize("baseline", [0.0, 3.7])
def test_expected_gradient_equals_exact_divergence_gradient(name, baseline):
    div, f = _get(name)
    for seed in range(3):
        theta, log_P, q, samples = _setup(seed)
        log_Z = torch.logsumexp(log_P, 0).item()  # exact Z
        th = theta.clone().requires_grad_(True)
        logpi = torch.log_softmax(th, 0)
        loss, metrics = fdpg_loss(
            logpi[samples], torch.log(q)[samples], log_P[samples], div, log_z=log_Z, baseline=baseline
        )
        (g,) = torch.autograd.grad(loss, th)

        th2 = theta.clone().requires_grad_(True)
        pi = torch.softmax(th2, 0)
        p = torch.exp(log_P) / torch.exp(log_P).sum()
        exact = (p * f(pi / p)).sum()
        (g_exact,) = torch.autograd.grad(exact, th2)
        torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-12)
        # the importance-sampling estimate of D_f over the exact q-expectation is D_f itself
        torch.testing.assert_close(metrics[f"div/{div.label}"], exact.detach(), rtol=1e-9, atol=1e-12)
        # E_q[(π/q) R] = E_π[R] with R = −f′(π/p), f′ by autograd of the test's f
        u = (pi / p).detach().requires_grad_(True)
        (fprime,) = torch.autograd.grad(f(u).sum(), u)
        e_pi_R = (-(pi.detach() * fprime)).sum()
        torch.testing.assert_close(metrics["fdpg/pseudo_reward_is"], e_pi_R, rtol=1e-9, atol=1e-12)


def test_wrong_z_changes_the_gradient():
    """Sanity: the test above can fail: with log Z off by 1 the gradient is not ∇D_f (except reverse KL)."""
    div, f = _get("js")
    theta, log_P, q, samples = _setup(0)
    th = theta.clone().requires_grad_(True)
    logpi = torch.log_softmax(th, 0)
    log_Z = torch.logsumexp(log_P, 0).item() + 1.0
    loss, _ = fdpg_loss(logpi[samples], torch.log(q)[samples], log_P[samples], div, log_z=log_Z)
    (g,) = torch.autograd.grad(loss, th)
    th2 = theta.clone().requires_grad_(True)
    pi = torch.softmax(th2, 0)
    p = torch.exp(log_P) / torch.exp(log_P).sum()
    (g_exact,) = torch.autograd.grad((p * f(pi / p)).sum(), th2)
    assert (g - g_exact).abs().max() > 1e-3


def test_reverse_kl_pseudo_reward_is_log_p_minus_log_pi_minus_1():
    div, _ = _get("reverse_kl")
    theta, log_P, q, _ = _setup(1)
    logpi = torch.log_softmax(theta, 0)
    log_Z = torch.logsumexp(log_P, 0).item()
    _, m = fdpg_loss(logpi, torch.log(q), log_P, div, log_z=log_Z)
    expected = ((log_P - log_Z) - logpi - 1).mean()
    torch.testing.assert_close(m["fdpg/pseudo_reward"], expected, rtol=1e-12, atol=1e-12)
    w = torch.exp(logpi) / q
    torch.testing.assert_close(m["fdpg/ess"], w.sum() ** 2 / (6 * (w**2).sum()), rtol=1e-12, atol=0)


def test_state_log_z_is_importance_sampling_estimate():
    g = torch.Generator().manual_seed(0)
    state = FDPGState()
    seen = []
    for _ in range(3):
        log_P = torch.randn(5, generator=g, dtype=torch.float64)
        log_q = torch.randn(5, generator=g, dtype=torch.float64) - 2
        log_P[0] = -math.inf  # a sample violating a binary constraint: P = 0
        state.update_log_z(log_P, log_q)
        seen += [math.exp(a - b) for a, b in zip(log_P.tolist(), log_q.tolist())]
        assert state.log_z == pytest.approx(math.log(sum(seen) / len(seen)), rel=1e-12)
    assert state.n_seen == 15


def test_state_log_z_converges_to_true_z():
    """Sampling from q, the estimate approaches the exact Z = Σ P (independent truth)."""
    g = torch.Generator().manual_seed(1)
    log_P = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    state = FDPGState()
    for _ in range(20):
        x = torch.multinomial(q, 2000, replacement=True, generator=g)
        state.update_log_z(log_P[x], torch.log(q)[x])
    assert state.log_z == pytest.approx(math.log(torch.exp(log_P).sum().item()), abs=0.03)


def test_state_baseline_moving_average_and_checkpoint():
    state = FDPGState(baseline_momentum=0.9)
    assert state.update_baseline(2.0) == 2.0
    assert state.update_baseline(4.0) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert state.update_baseline(float("nan")) == pytest.approx(2.2)  # ignored
    state.update_log_z(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -1.0]))
    other = FDPGState()
    other.load_state_dict(state.state_dict())
    assert other == state
    with pytest.raises(ValueError, match="baseline_momentum"):
        FDPGState(baseline_momentum=1.0)


@pytest.mark.parametrize("name", list(F_U))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_for_extreme_log_ratios(name, dtype):
    div, _ = _get(name)
    big = 1000.0
    logpi = torch.tensor([-big, -1.0, -2.0, -0.5, -big, -3.0], dtype=dtype, requires_grad=True)
    log_q = torch.tensor([-1.0, -big, -2.0, -0.5, -1.0, -3.0], dtype=dtype)
    log_P = torch.tensor([5.0, 0.0, -big, -math.inf, big, 0.0], dtype=dtype)
    loss, m = fdpg_loss(logpi, log_q, log_P, div, log_z=2.0, baseline=-1.0)
    (g,) = torch.autograd.grad(loss, logpi)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(torch.isfinite(v).all() for v in m.values()), m


def test_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="finite log Z"):
        fdpg_loss(x, x, x, "js", log_z=-math.inf)
    with pytest.raises(ValueError, match="one shape"):
        fdpg_loss(x, torch.zeros(4), x, "js", log_z=0.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        fdpg_loss(x, x, x, "nope", log_z=0.0)
