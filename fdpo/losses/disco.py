"""DisCO: discriminative constrained optimisation for reasoning models (NeurIPS 2025).

Source: Li et al., "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained
Optimization", NeurIPS 2025; conventions: `docs/objectives.md` §8.

Rows of the batch are consecutive groups of G = `group_size` completions of the same question (TRL's
GRPO ordering). For completion o with tokens o_1..o_n (mask m_t) the length-normalised score is

    log-L    s(o) = (1/n) Σ_t log π(o_t)
    L-ratio  s(o) = (1/n) Σ_t π(o_t)/π_old(o_t)   = exp(logsumexp_t(log π − log π_old) − log n)

(L-ratio is computed from the token log-ratios through a log-sum-exp, never as a raw ratio of
probabilities). For question q with positives S⁺ (reward > `positive_threshold`) and negatives S⁻:

    dro    J_q = mean_{S⁺} s − τ · log mean_{S⁻} exp(s/τ)         (τ log-sum-exp; τ = 10 log-L, 1 L-ratio)
    basic  J_q = mean_{S⁺} s − mean_{S⁻} s

Only questions with both kinds count; J = Σ_q J_q / Q with Q the number of ALL questions in the
batch. The trust region KL(π_old‖π) ≤ δ enters as a squared hinge:

    loss = −J + (β/2) · [KL̂ − δ]₊²,      KL̂ = Σ_{b,t} m·k / Σ_{b,t} m  (token mean over the batch)

with k = log π_old − log π (k1) or k = r − 1 − log r, r = π/π_old (k3; both unbiased for
KL(π_old‖π) on rollouts from π_old, both with expected gradient ∇KL(π_old‖π)). No clipping, no
reference model, no entropy term. Defaults δ = 1e-4, β = 1e3 as in the paper.

`old_token_logps=None` means π_old = sg(π) (one update per batch of rollouts): the L-ratio is then
1 in value with gradient ∇log π, and KL̂ = 0.

Metrics report the TRUE objective J (the released code logs a straight-through surrogate instead),
KL̂, whether the hinge is active, and the number of questions that contributed.

Numerics: inputs are upcast to at least fp32; masked log-sum-exps never see −inf rows (questions
without negatives are filled with zeros before the reduction and masked after), so no NaN leaks into
gradients. The two places where a ratio r = π/π_old is exponentiated (the L-ratio score and k3) are
exact while r ≤ 1e10 and continue linearly (C¹) beyond, so loss and gradients stay finite for
token log-ratios of ±1000 in fp32/bf16 (the squared hinge of a KL̂ near 1e13 is ~5e28 < fp32 max);
such ratios mean training has already diverged, and the values there are a finite signal, not math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdpo.divergences.numerics import exp_m1_mx

SCORES: tuple[str, ...] = ("log_l", "l_ratio")
FORMS: tuple[str, ...] = ("dro", "basic")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")
DEFAULT_TAU = {"log_l": 10.0, "l_ratio": 1.0}
#: ratios π/π_old are exact up to e^LOG_RATIO_CAP (= 1e10); beyond, a C¹ linear continuation.
LOG_RATIO_CAP = math.log(1e10)


def _exp_capped(x: Tensor) -> Tensor:
    """e^x for x ≤ c = LOG_RATIO_CAP, e^c (1 + x − c) beyond (value and slope continuous at c)."""
    c = LOG_RATIO_CAP
    return torch.where(x <= c, torch.exp(x.clamp(max=c)), math.exp(c) * (1.0 + (x - c)))


def _k3_capped(y: Tensor) -> Tensor:
    """k3 = e^y − 1 − y (y = log π − log π_old), accurate near 0, C¹-linear beyond y = LOG_RATIO_CAP."""
    c = LOG_RATIO_CAP
    value_c, slope_c = math.expm1(c) - c, math.expm1(c)
    return torch.where(y <= c, exp_m1_mx(y.clamp(max=c)), value_c + slope_c * (y - c))


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def disco_scores(
    token_logps: Tensor, mask: Tensor, *, old_token_logps: Tensor | None = None, score: str = "log_l"
) -> Tensor:
    """Per-completion length-normalised score s (B,) (see the module docstring), in ≥ fp32."""
    if score not in SCORES:
        raise ValueError(f"unknown DisCO score {score!r}; valid: {list(SCORES)}")
    logp = _upcast(token_logps)
    logp = torch.where(mask.bool(), logp, torch.zeros_like(logp))  # padding may hold −inf or garbage
    m = mask.to(logp.dtype)
    n = m.sum(-1).clamp(min=1.0)
    if score == "log_l":
        return (logp * m).sum(-1) / n
    old = logp.detach() if old_token_logps is None else _upcast(old_token_logps).detach().to(logp.dtype)
    logr = torch.where(mask.bool(), logp - old, torch.full_like(logp, -math.inf))
    # rows with no tokens: score 0 (their logsumexp would be −inf with NaN gradient)
    empty = ~mask.bool().any(-1, keepdim=True)
    logr = torch.where(empty, torch.zeros_like(logr), logr)
    s = _exp_capped(torch.logsumexp(logr, dim=-1) - torch.log(n))
    return torch.where(empty.squeeze(-1), torch.zeros_like(s), s)


def disco_kl(
    token_logps: Tensor, mask: Tensor, old_token_logps: Tensor | None, *, kl_estimator: str = "k1"
) -> Tensor:
    """KL̂: token mean over the batch of the k1 or k3 estimate of KL(π_old‖π) (0-d, ≥ fp32)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown DisCO kl_estimator {kl_estimator!r}; valid: {list(KL_ESTIMATORS)}")
    logp = _upcast(token_logps)
    m = mask.to(logp.dtype)
    if old_token_logps is None:
        return torch.zeros((), dtype=logp.dtype, device=logp.device)  # π_old = sg(π): KL̂ = 0
    keep = mask.bool()
    old = _upcast(old_token_logps).detach().to(logp.dtype)
    old_minus_new = torch.where(keep, old, torch.zeros_like(old)) - torch.where(
        keep, logp, torch.zeros_like(logp)
    )
    # k1 = log π_old − log π; k3 = r − 1 − log r with log r = log π − log π_old
    k = old_minus_new if kl_estimator == "k1" else _k3_capped(-old_minus_new)
    return (k * m).sum() / m.sum().clamp(min=1.0)


def disco_loss(
    token_logps: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    *,
    old_token_logps: Tensor | None = None,
    score: str = "log_l",
    form: str = "dro",
    tau: float | None = None,
    delta: float = 1e-4,
    constraint_beta: float = 1e3,
    kl_estimator: str = "k1",
    positive_threshold: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DisCO loss −J + (β/2)[KL̂ − δ]₊² of one batch (formulas in the module docstring).

    Args:
        token_logps: (B, T) log π of the sampled tokens (carries the gradient).
        mask: (B, T) 1 for completion tokens, 0 for padding.
        rewards: (B,) rewards; reward > `positive_threshold` marks a positive.
        group_size: G; B must be a multiple of G, rows [qG, (q+1)G) belong to question q.
        old_token_logps: (B, T) log π_old of the same tokens (detached); None = sg(token_logps).
        score: "log_l" or "l_ratio".
        form: "dro" (τ log-mean-exp over negatives) or "basic" (mean over negatives).
        tau: τ of the DRO form (default 10 for log_l, 1 for l_ratio).
        delta, constraint_beta: δ and β of the squared-hinge trust region.
        kl_estimator: "k1" or "k3" for KL̂.

    Returns:
        (loss, metrics): `loss` a 0-d tensor; metrics (detached 0-d): `disco/objective` (J, the true
        value), `disco/score_pos`, `disco/score_neg` (mean scores over the counted questions),
        `disco/kl` (KL̂), `disco/constraint_active` (1.0 if KL̂ > δ), `disco/penalty`,
        `disco/groups_used` and `disco/groups_total`.
    """
    if form not in FORMS:
        raise ValueError(f"unknown DisCO form {form!r}; valid: {list(FORMS)}")
    if score not in SCORES:
        raise ValueError(f"unknown DisCO score {score!r}; valid: {list(SCORES)}")
    tau = DEFAULT_TAU[score] if tau is None else float(tau)
    if not tau > 0:
        raise ValueError(f"DisCO tau must be positive, got {tau}")
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps and mask must both be (B, T); got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    if old_token_logps is not None and old_token_logps.shape != token_logps.shape:
        raise ValueError(
            f"old_token_logps {tuple(old_token_logps.shape)} must match token_logps {tuple(token_logps.shape)}"
        )
    batch = token_logps.shape[0]
    if group_size < 1 or batch % group_size:
        raise ValueError(f"batch size {batch} is not a multiple of group_size {group_size}")
    if rewards.shape != (batch,):
        raise ValueError(f"rewards must have shape ({batch},), got {tuple(rewards.shape)}")

    s = disco_scores(token_logps, mask, old_token_logps=old_token_logps, score=score)
    dtype = s.dtype
    n_groups = batch // group_size
    s = s.view(n_groups, group_size)
    pos = (rewards.detach() > positive_threshold).view(n_groups, group_size)
    neg = ~pos
    n_pos = pos.sum(-1)
    n_neg = neg.sum(-1)
    used = (n_pos > 0) & (n_neg > 0)

    zeros = torch.zeros_like(s)
    pos_mean = torch.where(pos, s, zeros).sum(-1) / n_pos.clamp(min=1).to(dtype)
    if form == "basic":
        neg_term = torch.where(neg, s, zeros).sum(-1) / n_neg.clamp(min=1).to(dtype)
    else:
        x = torch.where(neg, s / tau, torch.full_like(s, -math.inf))
        x = torch.where(used.unsqueeze(-1), x, zeros)  # no all −inf rows
        neg_term = tau * (torch.logsumexp(x, dim=-1) - torch.log(n_neg.clamp(min=1).to(dtype)))
    per_group = torch.where(used, pos_mean - neg_term, torch.zeros_like(pos_mean))
    objective = per_group.sum() / n_groups

    kl = disco_kl(token_logps, mask, old_token_logps, kl_estimator=kl_estimator)
    excess = torch.relu(kl - delta)
    penalty = 0.5 * constraint_beta * excess**2
    loss = -objective + penalty

    with torch.no_grad():
        n_used = used.sum()
        denom = n_used.clamp(min=1).to(dtype)
        metrics = {
            "disco/objective": objective.detach(),
            "disco/score_pos": torch.where(used, pos_mean, torch.zeros_like(pos_mean)).sum() / denom,
            "disco/score_neg": torch.where(used, neg_term, torch.zeros_like(neg_term)).sum() / denom,
            "disco/kl": kl.detach(),
            "disco/constraint_active": (kl.detach() > delta).to(dtype),
            "disco/penalty": penalty.detach(),
            "disco/groups_used": n_used.to(dtype),
            "disco/groups_total": torch.tensor(float(n_groups), dtype=dtype, device=s.device),
        }
    return loss, metrics
