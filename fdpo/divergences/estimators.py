"""Per-token sample estimators of D_f(π ‖ π_ref) (docs/objectives.md §1.2 and §1.3).

All functions take per-token log-probabilities of the SAMPLED tokens (any shape, the same for every
argument): ``logp`` = log π(a) carrying the gradient, ``ref_logp`` = log π_ref(a) (stored or from
a frozen reference; never differentiated), ``old_logp`` = log π_old(a) of the policy that sampled
the rollout (never differentiated). They return per-token values of the same shape (float32 for
half-precision inputs); reduce them (token mean, sequence sum, ...) as the objective requires.

"Expected gradient" below is E_{a∼S}[∇_θ loss(a)] with the samples and the sampling distribution S
held fixed: what autograd gives on average when the value is used as a loss. ℓ = logp − ref_logp,
u = e^ℓ, r = 1/u = π_ref/π.

======================================  ============  ===================  ======================
estimator                               samples from  value estimates      expected gradient
======================================  ============  ===================  ======================
ref_sample_generator_loss (f or f̃)      π_ref         D_f (unbiased)       ∇D_f (exact)
kl_k1 = −log r                          π             KL(π‖π_ref) (unb.)   0
kl_k2 = ½ (log r)²                      π             biased, ≥ 0          ∇KL(π‖π_ref)
kl_k3 = r − 1 − log r                   π             KL(π‖π_ref) (unb.)   ∇KL(π_ref‖π)  (!)
kl_k3_plus = k2 + sg(k3 − k2)           π             KL(π‖π_ref) (unb.)   ∇KL(π‖π_ref)
kl_k3_importance_weighted = (π/π_old)·k3  π_old       KL(π‖π_ref) (unb.)   ∇KL(π‖π_ref)
policy_sample_generator_loss            π_old (= π)   D_f (unbiased)       ∇D_f (score term in)
======================================  ============  ===================  ======================

The tests check every row against the autograd gradient of the exact divergence, by enumeration
over a small vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fdpo.divergences.base import Divergence
from fdpo.divergences.numerics import SAFE_FRACTION, compute_dtype
from fdpo.divergences.registry import get_divergence, resolve_divergence


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    dtype = compute_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    return logp.to(dtype) - ref_logp.detach().to(dtype)


def _importance_weighted(
    value: Tensor, logp: Tensor, old_logp: Tensor | None, score_function: bool
) -> Tensor:
    """ω·value with ω = π/π_old = exp(logp − sg(old_logp)) (old_logp defaults to sg(logp), so ω = 1 in
    value but ∇ω = ∇log π: the score-function term). Saturates instead of overflowing: log ω is
    capped at log(max/16) and the product at ±max/16 (gradient 0 where it saturates)."""
    if old_logp is None and not score_function:
        return value
    limit = torch.finfo(value.dtype).max * SAFE_FRACTION
    anchor = (logp if old_logp is None else old_logp).detach().to(value.dtype)
    log_w = logp.to(value.dtype) - anchor
    if not score_function:
        log_w = log_w.detach()
    weight = torch.exp(log_w.clamp(max=math.log(limit)))
    return (weight * value).clamp(-limit, limit)


def ref_sample_generator_loss(
    logp: Tensor, ref_logp: Tensor, divergence: str | Divergence, *, normalized: bool = True
) -> Tensor:
    """Per-token f(u) on tokens sampled from π_ref with stored log π_ref (the DPH-RL rehearsal loss).

    Value: E_{a∼π_ref}[f(u(a))] = Σ_a π_ref f(π/π_ref) = D_f(π‖π_ref), unbiased.
    Gradient: the samples do not depend on θ, so E_{π_ref}[∇f(u)] = ∇D_f(π‖π_ref) exactly.
    ``normalized=True`` (default) uses f̃(u) = f(u) − f′(1)(u − 1) ≥ 0, which has the same
    expectation (E_{π_ref}[u − 1] = 0 when π_ref covers π's support) and the same expected gradient
    (∇Σ_a π(a) = 0) with lower variance; for forward KL it is DPH-RL's u − log u − 1, for JS (whose
    f′(1) = 0) DPH-RL's u log u − (u+1) log((u+1)/2) is 2× this f. No clamp on the value beyond
    the representable range (docs/objectives.md §7: clamping the forward term biases it).
    """
    div = resolve_divergence(divergence)
    logr = _log_ratio(logp, ref_logp)
    return div.f_normalized(logr) if normalized else div.f(logr)


def policy_sample_generator_loss(
    logp: Tensor,
    ref_logp: Tensor,
    divergence: str | Divergence,
    *,
    old_logp: Tensor | None = None,
    normalized: bool = True,
    score_function: bool = True,
) -> Tensor:
    """Per-token ω·g(u), g = f(u)/u (or f̃(u)/u), on rollouts sampled from π_old (= π on-policy).

    Value: E_{a∼π_old}[(π/π_old) f(u)/u] = Σ_a π_ref f(u) = D_f(π‖π_ref), unbiased.
    Gradient: with the score-function term (``score_function=True``, ω = exp(logp − sg(old_logp)),
    old_logp defaulting to sg(logp) so that ω = 1 in value), E_{π_old}[∇(ω g)] = ∇D_f(π‖π_ref)
    exactly, on- or off-policy. Without it (ω detached) the expected gradient is the pathwise part
    Σ_a π(a) ∇g(u_a) only, which is NOT ∇D_f in general (for reverse KL it is 0 (k1), for
    normalised reverse KL ∇KL(π_ref‖π) (k3)). For reverse KL with ``normalized=True`` this is
    exactly k3 × importance ratio.
    """
    div = resolve_divergence(divergence)
    logr = _log_ratio(logp, ref_logp)
    g = div.f_normalized_over_u(logr) if normalized else div.f_over_u(logr)
    return _importance_weighted(g, logp, old_logp, score_function)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = −log r = log π − log π_ref on samples from π.

    Value: unbiased for KL(π‖π_ref) (high variance, can be negative).
    Gradient: E_π[∇ log π] = Σ_a ∇π(a) = 0: as a loss it regularises nothing in expectation.
    """
    return _log_ratio(logp, ref_logp)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log r)² on samples from π.

    Value: biased estimate of KL(π‖π_ref) (exact to second order), ≥ 0.
    Gradient: E_π[ℓ ∇ℓ] = Σ_a π ℓ ∇log π = ∇KL(π‖π_ref): the reverse-KL gradient.
    """
    logr = _log_ratio(logp, ref_logp)
    return 0.5 * logr * logr


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = r − 1 − log r (r = π_ref/π) on samples from π; TRL's default KL estimator.

    Value: unbiased for KL(π‖π_ref), ≥ 0, low variance.
    Gradient (careful): E_π[∇k3] = Σ_a π (1 − r) ∇log π = −Σ_a π_ref ∇log π = ∇KL(π_ref‖π): used
    as a loss, k3 follows the FORWARD-KL gradient, not the reverse KL it estimates. Use
    :func:`kl_k3_importance_weighted` for the reverse-KL gradient.
    """
    return get_divergence("reverse_kl").f_normalized_over_u(_log_ratio(logp, ref_logp))


def kl_k3_plus(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3⁺ = k2 + sg(k3 − k2) on samples from π: k3's value with k2's gradient (straight-through).

    Value: k3 = r − 1 − log r exactly, so unbiased for KL(π‖π_ref) and ≥ 0 (low variance).
    Gradient: ∇k2 = ℓ∇ℓ, so E_π[∇k3⁺] = ∇KL(π‖π_ref): the reverse-KL gradient that k3 itself lacks,
    without an importance ratio (the form verl / NeMo-RL users call "k3+"; docs/objectives.md §6.1).
    """
    k2 = kl_k2(logp, ref_logp)
    return k2 + (kl_k3(logp, ref_logp) - k2).detach()


def kl_k3_importance_weighted(logp: Tensor, ref_logp: Tensor, old_logp: Tensor) -> Tensor:
    """(π/π_old)·k3 on samples from π_old (TRL 1.16 ``use_bias_correction_kl=True``).

    Value: E_{π_old}[(π/π_old) k3] = E_π[k3] = KL(π‖π_ref), unbiased.
    Gradient: E_{π_old}[∇((π/π_old) k3)] = ∇KL(π‖π_ref) exactly (on-policy the ratio is 1 in value
    and contributes the score-function term k3 ∇log π). ``old_logp`` is detached.
    """
    return policy_sample_generator_loss(logp, ref_logp, "reverse_kl", old_logp=old_logp, normalized=True)
