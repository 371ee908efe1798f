"""DPH-RL rehearsal loss: η · token-mean f(u) on stored samples of the reference policy.

Source: "The Choice of Divergence" (DPH-RL, ICLR 2026); conventions: docs/objectives.md §0, §1.2, §7.
Before RL, `fdpo presample` draws completions y ~ π_ref (the initial policy, at the
training temperature) for the prompts it already solves (D_pef) and stores log π_ref(y_t | x, y_<t)
per token. During RL, with ℓ_t = log π(y_t|·) − stored log π_ref(y_t|·) and u_t = e^{ℓ_t}:

    L_rehearsal = Σ_{t ∈ mask} s_f · f̃(u_t) / Σ_{t ∈ mask} 1,      f̃(u) = f(u) − f′(1)(u − 1).

Why this is the divergence (docs/objectives.md §1.2): the tokens are drawn from π_ref and do not depend
on θ, so E_{y_t∼π_ref}[f(u_t)] = Σ_v π_ref(v) f(π(v)/π_ref(v)) = D_f(π‖π_ref)(· | prefix) and
E[∇f(u_t)] = ∇D_f exactly. The tangent term −f′(1)(u − 1) has expectation Σ_v π_ref(u − 1) =
Σ_v π − 1 = 0 and expected gradient ∇Σ_v π(v) = 0, so f̃ estimates the same divergence with the
same expected gradient; per sample it is ≥ 0 (f convex, f̃(1) = f̃′(1) = 0) and has lower variance.

The per-sample values actually optimised (DPH-RL's released forms, `convention="dph"`):

    forward_kl   f̃ = u − log u − 1                      (registry f = −log u, f′(1) = −1)
    js           2 f̃ = u log u − (u + 1) log((u + 1)/2)  (= 2·JS in expectation; registry f is ½[…],
                                                          f′(1) = 0, so s_js = 2 as in f-DPO)
    alpha        f̃ = f = (u^{1−α} − (1−α)u − α)/(α(α−1)) (f′(1) = 0; α as in docs/objectives.md, = 1 − TRL's a)
    any other    f̃ = f − f′(1)(u − 1) of the registry    (reverse_kl: u log u − u + 1, ...)

so the paper's η (0.01–0.05 forward, 0.05–0.2 JS) carries over unchanged. `convention="registry"`
uses the registry's f itself (s_f = 1, no tangent term): the same expected value and gradient of
D_f(π‖π_ref), with higher per-sample variance (for forward KL, −log u alone).

Numerics: ℓ is formed in ≥ fp32 (bf16 inputs upcast), f̃ is the registry's log-space form (exact
wherever it is representable). The value is NOT clamped (docs/objectives.md §7: clamping the forward
term, as verl does at 10, biases it low); only beyond the fp32-representable range (ℓ ≳ 85 for
forward KL) does the registry saturate, counted by `fdpo.divergences.saturation_counts`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdpo.divergences import Divergence, resolve_divergence
from fdpo.divergences.numerics import compute_dtype

CONVENTIONS: tuple[str, ...] = ("dph", "registry")


def rehearsal_scale(divergence: str | Divergence, convention: str = "dph") -> float:
    """s_f: the factor between the optimised per-sample value and the registry's f̃ (or f): the
    registry entry's ``dph_generator_scale`` with ``convention="dph"``, else 1."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown rehearsal convention {convention!r}; valid: {list(CONVENTIONS)}")
    div = resolve_divergence(divergence)
    return float(div.dph_generator_scale) if convention == "dph" else 1.0


def rehearsal_token_values(
    policy_token_logps: Tensor,
    ref_token_logps: Tensor,
    divergence: str | Divergence,
    *,
    convention: str = "dph",
) -> Tensor:
    """Per-token values s_f·f̃(u) (``dph``) or f(u) (``registry``), shape of the inputs, ≥ fp32.

    ``ref_token_logps`` is detached (stored values, never differentiated).
    """
    if policy_token_logps.shape != ref_token_logps.shape:
        raise ValueError(
            f"policy_token_logps {tuple(policy_token_logps.shape)} and ref_token_logps "
            f"{tuple(ref_token_logps.shape)} differ in shape"
        )
    div = resolve_divergence(divergence)
    scale = rehearsal_scale(div, convention)
    dtype = compute_dtype(torch.promote_types(policy_token_logps.dtype, ref_token_logps.dtype))
    logr = policy_token_logps.to(dtype) - ref_token_logps.detach().to(dtype)
    values = div.f_normalized(logr) if convention == "dph" else div.f(logr)
    return values * scale if scale != 1.0 else values


def rehearsal_loss(
    policy_token_logps: Tensor,
    ref_token_logps: Tensor,
    completion_mask: Tensor,
    divergence: str | Divergence,
    *,
    convention: str = "dph",
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPH-RL rehearsal loss: token-mean of the per-sample generator on stored π_ref samples.

    Args:
        policy_token_logps: (B, T) log π(y_t | x, y_<t) of the stored completion tokens at the
            sampling temperature (logits / T), carrying the gradient.
        ref_token_logps: (B, T) stored log π_ref of the same tokens (same temperature).
        completion_mask: (B, T) 1 for completion tokens (eos included), 0 for padding.
        divergence: a registry name (aliases accepted) or a `Divergence` object.
        convention: ``"dph"`` (default: DPH-RL's per-sample forms, see the module docstring) or
            ``"registry"`` (the registry's f, no tangent term, no scale).
        num_tokens: the token-mean's denominator; default: ``completion_mask.sum()`` of this batch
            (pass the global count when a rehearsal batch is split over gradient-accumulation steps
            or processes, so the mean is over the whole batch).

    Returns:
        (loss, metrics): scalar loss (≥ fp32; multiply by η), and detached scalar metrics:
        ``div/<label>``: token mean of the per-sample value without the DPH scale (f̃(u), or f(u)
        under ``registry``): an unbiased estimate of D_f(π‖π_ref) per token on the stored π_ref
        samples; ``rehearsal/loss``: token mean of the optimised value over this batch's mask;
        ``rehearsal/logratio_mean``, ``rehearsal/logratio_abs_max`` (ℓ = log π − log π_ref) and
        ``rehearsal/tokens`` (mask count).
    """
    div = resolve_divergence(divergence)
    if completion_mask.shape != policy_token_logps.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} and token log-probs "
            f"{tuple(policy_token_logps.shape)} differ in shape"
        )
    values = rehearsal_token_values(policy_token_logps, ref_token_logps, div, convention=convention)
    mask = completion_mask.to(values.dtype)
    count = mask.sum()
    denom = count.clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
    # where(): a saturated/odd value on a padding position cannot leak into the loss (0·inf = NaN)
    loss = torch.where(mask > 0, values, torch.zeros_like(values)).sum() / denom

    with torch.no_grad():
        on = mask > 0
        zero = torch.zeros_like(values)
        safe = count.clamp(min=1.0)
        logr = policy_token_logps.detach().to(values.dtype) - ref_token_logps.detach().to(values.dtype)
        f_tilde = values.detach() / rehearsal_scale(div, convention)
        metrics = {
            f"div/{div.label}": torch.where(on, f_tilde, zero).sum() / safe,
            "rehearsal/loss": torch.where(on, values.detach(), zero).sum() / safe,
            "rehearsal/logratio_mean": torch.where(on, logr, zero).sum() / safe,
            "rehearsal/logratio_abs_max": torch.where(on, logr.abs(), zero).amax() if logr.numel() else safe * 0,
            "rehearsal/tokens": count,
        }
    return loss, metrics
