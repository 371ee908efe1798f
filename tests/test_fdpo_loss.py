"""f-DPO loss (fdpo.losses.fdpo_loss) against independent truths.

- TRL 1.16 run live: `DPOTrainer._compute_loss` on the same per-token log-probs, for the four divergences
  TRL has (reverse_kl, forward_kl, js_divergence, alpha_divergence with a = 1 − α) × sigmoid/hinge/ipo/robust;
  loss values and gradients.
- Every f-DPO-valid divergence against float64 formulas written out here (f′ in u-space, from the table in
  docs/objectives.md §0; the f-DPO scores in ℓ-space from §3), never a number the code produced.
- Stability for sequence log-ratios down to −1000 and up to +1000 in fp32 and bf16.
- pearson_chi2 / total_variation rejected at config time, with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from dpo_fixtures import (
    LOSS_METRICS,
    FakePolicy,
    fake_batch,
    tiny_model,
    tiny_preference_dataset,
    tiny_tokenizer,
)

from fdpo.losses.fdpo_loss import SCORE_LOSS_TYPES, FDPOScore, fdpo_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# ---------------------------------------------------------------------------------------------------------------
# Independent f′(u) (docs/objectives.md §0 table), float64, evaluated from u = e^ℓ. `scale` is the f-DPO paper's
# generator scale (§3: the JS score is log σ(ℓ_w) − log σ(ℓ_l), i.e. 2× the table's ½ log(2u/(1+u))).


def _alpha_fprime(a: float):
    return lambda u: (1 - u ** (-a)) / a


VALID = {
    # id: (registry name, params, f′(u), scale)
    "reverse_kl": ("reverse_kl", {}, lambda u: torch.log(u) + 1, 1.0),
    "forward_kl": ("forward_kl", {}, lambda u: -1 / u, 1.0),
    "js": ("js", {}, lambda u: 0.5 * torch.log(2 * u / (1 + u)), 2.0),
    "alpha0.25": ("alpha", {"alpha": 0.25}, _alpha_fprime(0.25), 1.0),
    "alpha0.5": ("alpha", {"alpha": 0.5}, _alpha_fprime(0.5), 1.0),
    "alpha0.75": ("alpha", {"alpha": 0.75}, _alpha_fprime(0.75), 1.0),
    "jeffreys": ("jeffreys", {}, lambda u: torch.log(u) + 1 - 1 / u, 1.0),
    "squared_hellinger": ("squared_hellinger", {}, lambda u: 1 - u ** (-0.5), 1.0),
    "neyman_chi2": ("neyman_chi2", {}, lambda u: 1 - u ** (-2.0), 1.0),
    # generalised JSD(b) = b KL(π‖m) + (1−b) KL(π_ref‖m), m = bπ + (1−b)π_ref: f′(u) = b log(u/(bu + 1 − b))
    "generalized_jsd0.3": (
        "generalized_jsd",
        {"beta": 0.3},
        lambda u: 0.3 * torch.log(u / (0.3 * u + 0.7)),
        1.0,
    ),
}
EXPONENTIAL_TAIL = [
    "forward_kl",
    "alpha0.25",
    "alpha0.5",
    "alpha0.75",
    "jeffreys",
    "squared_hellinger",
    "neyman_chi2",
]

# TRL 1.16's names: `f_divergence_type` and `f_alpha_divergence_coef` a = 1 − α (docs/objectives.md §0 note).
TRL_CASES = {
    "reverse_kl": ("reverse_kl", {}, "reverse_kl", 0.5),
    "forward_kl": ("forward_kl", {}, "forward_kl", 0.5),
    "js": ("js", {}, "js_divergence", 0.5),
    "alpha0.25": ("alpha", {"alpha": 0.25}, "alpha_divergence", 0.75),
    "alpha0.5": ("alpha", {"alpha": 0.5}, "alpha_divergence", 0.5),
    "alpha0.8": ("alpha", {"alpha": 0.8}, "alpha_divergence", 0.2),
}


def _score(name: str, logr: torch.Tensor) -> torch.Tensor:
    _, _, fprime, scale = VALID[name]
    u = torch.exp(logr)
    return scale * (fprime(u) - fprime(torch.ones_like(u)))


def _expected_loss(s_w, s_l, loss_type, beta, eps, n_w, n_l):
    x = beta * (s_w - s_l)
    zero = torch.zeros_like(x)

    def softplus(t):  # −log σ(x) = log(1 + e^{−x}) = softplus(−x)
        return torch.logaddexp(zero, t)

    if loss_type == "sigmoid":
        return softplus(-x)
    if loss_type == "hinge":
        return torch.clamp(1 - x, min=0)
    if loss_type == "ipo":
        return (s_w / n_w - s_l / n_l - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return softplus(-beta * (s_w / n_w - s_l / n_l))
    if loss_type == "exo_pair":  # KL(q‖p), q = (σ(x), σ(−x)), p = (1 − ε, ε)
        q = torch.sigmoid(x)
        return q * (-softplus(-x) - math.log(1 - eps)) + (1 - q) * (-softplus(x) - math.log(eps))
    if loss_type == "discopop":
        m = torch.sigmoid(x / 0.05)
        return softplus(-x) * (1 - m) + torch.exp(-x) * m
    assert loss_type == "robust"
    return ((1 - eps) * softplus(-x) - eps * softplus(x)) / (1 - 2 * eps)


# the loss types of f-DPO on the score margin (`sft` has no score: tests/test_trl_dropin.py checks it against TRL)
PAIR_LOSS_TYPES = [t for t in SCORE_LOSS_TYPES if t != "sft"]
# those whose gradient pushes a losing pair apart at any margin (exo_pair saturates: a KL of two Bernoullis;
# discopop is non-monotone near a zero margin by design, DiscoPOP §5)
NON_SATURATING = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "robust")


def _pairs(n: int, low: float, high: float, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, n, generator=g, dtype=torch.float64) * 50  # policy_w, policy_l, ref_w, ref_l
    logr = low + (high - low) * torch.rand(2, n, generator=g, dtype=torch.float64)
    logps[2] = logps[0] - logr[0]
    logps[3] = logps[1] - logr[1]
    lengths = torch.randint(1, 30, (2, n), generator=g)
    return logps.to(dtype), lengths


# ---------------------------------------------------------------------------------------------------------------
# (b) every valid divergence vs float64 formulas


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
@pytest.mark.parametrize("name", list(VALID))
def test_loss_and_gradient_match_independent_float64(name, loss_type):
    registry_name, params, _, _ = VALID[name]
    beta, eps = 0.3, 0.2
    logps, lengths = _pairs(32, -5.0, 5.0, seed=list(VALID).index(name))
    ours_in = logps.clone().requires_grad_(True)
    ref_in = logps.clone().requires_grad_(True)

    loss, _ = fdpo_loss(
        *ours_in,
        FDPOScore(registry_name, **params),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
    )
    assert loss.dtype == torch.float64
    s_w = _score(name, ref_in[0] - ref_in[2])
    s_l = _score(name, ref_in[1] - ref_in[3])
    expected = _expected_loss(s_w, s_l, loss_type, beta, eps, lengths[0].double(), lengths[1].double())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(loss.sum(), ours_in)
    (g_ref,) = torch.autograd.grad(expected.sum(), ref_in)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_scores_follow_objectives_section_3():
    """§3 in terms of ℓ: reverse KL ℓ_w − ℓ_l; forward KL e^{−ℓ_l} − e^{−ℓ_w}; JS log σ(ℓ_w) − log σ(ℓ_l);
    α (e^{−αℓ_l} − e^{−αℓ_w})/α."""
    logps, _ = _pairs(64, -6.0, 6.0, seed=3)
    lw, ll = logps[0] - logps[2], logps[1] - logps[3]
    expected = {
        ("reverse_kl", None): lw - ll,
        ("forward_kl", None): torch.exp(-ll) - torch.exp(-lw),
        ("js", None): torch.log(torch.sigmoid(lw)) - torch.log(torch.sigmoid(ll)),
        ("alpha", 0.3): (torch.exp(-0.3 * ll) - torch.exp(-0.3 * lw)) / 0.3,
    }
    for (name, a), margin in expected.items():
        params = {} if a is None else {"alpha": a}
        _, metrics = fdpo_loss(*logps, FDPOScore(name, **params), beta=0.1)
        torch.testing.assert_close(metrics["scores/margins"], margin, rtol=1e-10, atol=1e-12)


def test_metrics():
    logps, _ = _pairs(16, -3.0, 3.0, seed=5)
    beta = 0.25
    lw, ll = logps[0] - logps[2], logps[1] - logps[3]
    score = FDPOScore("reverse_kl")
    _, m = fdpo_loss(*logps, score, beta=beta)
    label = score.label
    assert set(m) == LOSS_METRICS | {f"div/{label}"}
    torch.testing.assert_close(m["rewards/chosen"], beta * lw)
    torch.testing.assert_close(m["rewards/margins"], beta * (lw - ll))
    torch.testing.assert_close(m["rewards/accuracies"], (lw > ll).double())
    # reverse KL, f(u) = u log u standardised: u log u − u + 1 ≥ 0, averaged over chosen and rejected
    u_w, u_l = torch.exp(lw), torch.exp(ll)
    expected_div = 0.5 * ((u_w * lw - u_w + 1) + (u_l * ll - u_l + 1))
    torch.testing.assert_close(m[f"div/{label}"], expected_div, rtol=1e-10, atol=1e-12)
    for name, (registry_name, params, _, _) in VALID.items():
        s = FDPOScore(registry_name, **params)
        _, m = fdpo_loss(*logps, s, beta=beta)
        div = m[f"div/{s.label}"]
        assert bool((div >= -1e-12).all()), name
        same = logps.clone()
        same[2:] = same[:2]  # π = π_ref on these sequences
        _, m0 = fdpo_loss(*same, s, beta=beta)
        torch.testing.assert_close(
            m0[f"div/{s.label}"], torch.zeros(16, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_alpha_limits_approach_reverse_and_forward_kl():
    logps, _ = _pairs(16, -2.0, 2.0, seed=9)
    rkl, _ = fdpo_loss(*logps, FDPOScore("reverse_kl"), beta=0.5)
    fkl, _ = fdpo_loss(*logps, FDPOScore("forward_kl"), beta=0.5)
    near0, _ = fdpo_loss(*logps, FDPOScore("alpha", alpha=1e-4), beta=0.5)
    near1, _ = fdpo_loss(*logps, FDPOScore("alpha", alpha=1 - 1e-4), beta=0.5)
    torch.testing.assert_close(near0, rkl, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(near1, fkl, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# (c) stability


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*EXPONENTIAL_TAIL, "js", "reverse_kl", "generalized_jsd0.3"])
def test_finite_with_nonzero_gradient_for_extreme_log_ratios(name, dtype):
    registry_name, params, _, _ = VALID[name]
    score = FDPOScore(registry_name, **params)
    grid = [-1000.0, -300.0, -90.0, -30.0, 0.0, 30.0, 90.0, 300.0, 1000.0]
    lw = torch.tensor([a for a in grid for _ in grid], dtype=torch.float32)
    ll = torch.tensor([b for _ in grid for b in grid], dtype=torch.float32)
    ref_w = torch.full_like(lw, -400.0)
    ref_l = torch.full_like(ll, -350.0)
    for loss_type in PAIR_LOSS_TYPES:
        pw = (ref_w + lw).to(dtype).requires_grad_(True)
        pl = (ref_l + ll).to(dtype).requires_grad_(True)
        loss, metrics = fdpo_loss(
            pw,
            pl,
            ref_w.to(dtype),
            ref_l.to(dtype),
            score,
            beta=0.1,
            loss_type=loss_type,
            label_smoothing=0.1,
            chosen_lengths=torch.full_like(lw, 6),
            rejected_lengths=torch.full_like(ll, 6),
        )
        assert bool(torch.isfinite(loss).all()), (name, loss_type, loss)
        g_w, g_l = torch.autograd.grad(loss.sum(), (pw, pl))
        assert bool(torch.isfinite(g_w).all() and torch.isfinite(g_l).all()), (name, loss_type)
        assert bool(torch.isfinite(metrics["scores/margins"]).all())
        # where the chosen completion is behind (ℓ_w ≤ ℓ_l, ℓ_w ≤ 0; includes ℓ_w = −1000 against any ℓ_l ≥ ℓ_w) the
        # exact gradient pushes ℓ_w up (and ℓ_l down) with a non-vanishing force: fdpo's must be non-zero, same sign
        real_w = pw.detach().float() - ref_w.to(dtype).float()  # ℓ as the rounded inputs give it
        real_l = pl.detach().float() - ref_l.to(dtype).float()
        push = (real_w <= real_l) & (real_w <= 0)
        assert int(push.sum()) >= 20
        if loss_type not in NON_SATURATING:
            continue
        assert bool((g_w[push].float() < 0).all()), (name, loss_type, g_w[push])
        assert bool((g_l[push & (real_l < 0)].float() > 0).all()), (name, loss_type)


@pytest.mark.parametrize("name", EXPONENTIAL_TAIL)
def test_continuation_is_c1_and_exact_inside_the_cap(name):
    registry_name, params, _, _ = VALID[name]
    score = FDPOScore(registry_name, **params)
    lo = score.lo
    assert -200.0 < lo < -5.0
    x = torch.tensor([lo - 1e-6, lo + 1e-6], dtype=torch.float64, requires_grad=True)
    y = score(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y[0], y[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(g[0], g[1], rtol=1e-4, atol=0)
    inside = torch.linspace(lo + 1e-3, 20.0, 101, dtype=torch.float64)
    torch.testing.assert_close(score(inside), _score(name, inside), rtol=1e-10, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# (d) rejection


@pytest.mark.parametrize(
    ("name", "reason"), [("pearson_chi2", "0 is in the domain of f′"), ("total_variation", "not invertible")]
)
def test_invalid_divergences_rejected_with_reason(name, reason, tmp_path):
    from fdpo.trainers.dpo import FDPOConfig

    with pytest.raises(ValueError, match=reason):
        FDPOScore(name)
    with pytest.raises(ValueError, match=f"(?s){name}.*{reason}"):
        FDPOConfig(output_dir=str(tmp_path), divergence=name, report_to="none", bf16=False)


def test_config_rejects_unknown_fields_and_bad_combinations(tmp_path):
    from fdpo.trainers.dpo import FDPOConfig

    kw = {"output_dir": str(tmp_path), "report_to": "none", "bf16": False}
    with pytest.raises(ValueError, match="reverse_kl"):  # the registry lists the valid names
        FDPOConfig(divergence="kll_divergence", **kw)
    with pytest.raises(ValueError, match=r"(?s)loss_type.*nca_pair.*divergence.*js"):
        FDPOConfig(loss_type=["nca_pair"], divergence="js", **kw)
    with pytest.raises(ValueError, match="label_smoothing"):
        FDPOConfig(loss_type=["robust"], label_smoothing=0.5, **kw)
    config = FDPOConfig(divergence="alpha", alpha=0.3, **kw)
    assert config.divergence == "alpha" and config.divergence_kwargs() == {"alpha": 0.3}


# ---------------------------------------------------------------------------------------------------------------
# (a) TRL 1.16 live: DPOTrainer._compute_loss on the same per-token log-probs


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")),
        report_to="none",
        bf16=False,
        use_cpu=True,
        precompute_ref_log_probs=True,
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=tiny_model(tok), args=args, train_dataset=tiny_preference_dataset(), processing_class=tok
    )
    trainer.model.train()
    return trainer


def trl_loss_and_grad(trainer, inputs, per_token, *, f_type, coef, loss_type, beta, eps):
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = f_type, coef
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, eps
    leaf = per_token.clone().requires_grad_(True)
    loss = trainer._compute_loss(FakePolicy(leaf), inputs, False)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
@pytest.mark.parametrize("case", list(TRL_CASES))
def test_matches_trl_dpo_trainer_live(trl_trainer, case, loss_type):
    name, params, f_type, coef = TRL_CASES[case]
    beta, eps = 0.5, 0.15
    inputs, per_token = fake_batch(8, 12, seed=len(case) * 7 + len(loss_type))
    trl_loss, trl_grad = trl_loss_and_grad(
        trl_trainer, inputs, per_token, f_type=f_type, coef=coef, loss_type=loss_type, beta=beta, eps=eps
    )

    leaf = per_token.clone().requires_grad_(True)
    chosen, rejected = leaf.sum(dim=1).chunk(2)
    n_w, n_l = inputs["completion_mask"].sum(dim=1).chunk(2)
    per_pair, _ = fdpo_loss(
        chosen,
        rejected,
        inputs["ref_chosen_logps"],
        inputs["ref_rejected_logps"],
        FDPOScore(name, **params),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths=n_w,
        rejected_lengths=n_l,
    )
    loss = per_pair.mean()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert math.isfinite(float(trl_loss))
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=2e-4, atol=1e-6)
