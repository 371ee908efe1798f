"""Token-level preference losses: TDPO1, TDPO2 and SparsePO (docs/objectives.md §4).

Sources: Zeng et al., "Token-level Direct Preference Optimization" (TDPO, ICML 2024); Christopoulou et al.,
"SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks" (Findings of EMNLP 2025).

Per completion token t of a sequence y (chosen w or rejected l):

    r_t  = log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)                   (per-token reward)
    KL_t = KL(π_ref(·|x, y_<t) ‖ π(·|x, y_<t))                               (sequential KL, full vocab)

KL_t is ``forward_kl`` in the registry's naming (D_f(π‖π_ref) with f(u) = −log u); any registered
divergence may take its place (``token_divergence``), evaluated exactly over the vocabulary in chunks by
`fdpo.divergences.full_vocab_divergence(_from_hidden)`. With token masks m^u (reward) and m^d (KL):

    z = Σ_t m^u_t r_t(w) − Σ_t m^u_t r_t(l) + Σ_t m^d_t KL_t(w) − Σ_t m^d_t KL_t(l)
    L = −log σ(β z) + λ_u ‖m^u‖₁ + λ_d ‖m^d‖₁        (both λ halved when one mask is shared)

- ``tdpo1``: all masks 1, λ = 0 (TDPO1: −log σ(u − δ), δ = β KL_seq(l) − β KL_seq(w)).
- ``tdpo2``: z = Σ r(w) − Σ r(l) + α (sg[KL_seq(w)] − KL_seq(l)) (TDPO2, α = ``tdpo_alpha``, 0.5 in the
  paper; sg = stop-gradient).
- ``sparsepo``: the masks given (learned or activation masks; None means all ones). ‖m‖₁ is taken per pair
  over the completion tokens of both sides (masks are ≥ 0, so it is their sum) and averaged over pairs like
  the loss itself.

All sums run in ≥ fp32; −log σ is evaluated as softplus(−βz) (finite for any finite z).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fdpo.divergences import Divergence, full_vocab_divergence, full_vocab_divergence_from_hidden

TOKEN_OBJECTIVES = ("tdpo1", "tdpo2", "sparsepo")
#: the divergence of TDPO / SparsePO's sequential term: KL(π_ref ‖ π)
DEFAULT_TOKEN_DIVERGENCE = "forward_kl"


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_rewards(policy_logps: Tensor, ref_logps: Tensor, completion_mask: Tensor) -> Tensor:
    """r_t = log π(y_t) − log π_ref(y_t) on completion tokens, 0 elsewhere (≥ fp32)."""
    mask = completion_mask.to(torch.bool)
    return torch.where(mask, _f32(policy_logps) - _f32(ref_logps).detach(), 0.0)


def sequential_divergence(
    policy_logits: Tensor,
    ref_logits: Tensor,
    completion_mask: Tensor,
    divergence: str | Divergence = DEFAULT_TOKEN_DIVERGENCE,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-position D(π(·|prefix) ‖ π_ref(·|prefix)) from (..., V) logits, 0 where the mask is 0.

    With the default ``forward_kl`` this is KL_t = KL(π_ref ‖ π). The reference side is detached.
    """
    return full_vocab_divergence(
        policy_logits, ref_logits.detach(), divergence, completion_mask.to(torch.bool), chunk_size=chunk_size
    )


def sequential_divergence_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ref_hidden: Tensor,
    ref_lm_head_weight: Tensor,
    completion_mask: Tensor,
    divergence: str | Divergence = DEFAULT_TOKEN_DIVERGENCE,
    *,
    lm_head_bias: Tensor | None = None,
    ref_lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """As `sequential_divergence`, from final hidden states (the LM head is projected chunk by chunk;
    the (batch, seq, vocab) logits are never built). The reference side is detached."""
    return full_vocab_divergence_from_hidden(
        hidden,
        lm_head_weight,
        ref_hidden.detach(),
        ref_lm_head_weight.detach(),
        divergence,
        completion_mask.to(torch.bool),
        lm_head_bias=lm_head_bias,
        ref_lm_head_bias=None if ref_lm_head_bias is None else ref_lm_head_bias.detach(),
        chunk_size=chunk_size,
    )


def token_level_loss(
    rewards: Tensor,
    divergences: Tensor,
    completion_mask: Tensor,
    *,
    beta: float,
    objective: str = "sparsepo",
    reward_mask: Tensor | None = None,
    kl_mask: Tensor | None = None,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    shared_mask: bool = False,
    tdpo_alpha: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair TDPO1 / TDPO2 / SparsePO loss (module docstring) and per-pair metrics.

    Args:
        rewards, divergences: (2B, T) per-token r_t and KL_t (0 off the completion), chosen rows first
            then rejected rows (TRL's batch layout).
        completion_mask: (2B, T), 1 on completion tokens.
        reward_mask, kl_mask: (2B, T) masks m^u, m^d (≥ 0; may carry gradients), None = all ones.
            ``sparsepo`` only.
        shared_mask: True when m^u and m^d are the same mask ("common"): both L1 weights are halved.
    Returns:
        (loss, metrics): loss (B,) in ≥ fp32; metrics maps names to detached (B,) tensors: β-scaled masked
        rewards/KL terms of each side, margins, accuracies, `z`.
    """
    if objective not in TOKEN_OBJECTIVES:
        raise ValueError(f"objective must be one of {TOKEN_OBJECTIVES}, got {objective!r}")
    if objective != "sparsepo" and (reward_mask is not None or kl_mask is not None):
        raise ValueError(f"objective {objective!r} uses no token masks (all ones); use objective 'sparsepo'")
    if rewards.shape != divergences.shape or rewards.shape != completion_mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, divergences {tuple(divergences.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must have the same (2B, T) shape"
        )
    if rewards.shape[0] % 2:
        raise ValueError("the batch must hold chosen rows then rejected rows (an even number of rows)")
    cm = completion_mask.to(torch.float32)
    r, kl = _f32(rewards) * cm, _f32(divergences) * cm
    mu = cm if reward_mask is None else _f32(reward_mask) * cm
    md = cm if kl_mask is None else _f32(kl_mask) * cm
    reward_seq = (mu * r).sum(dim=1)
    kl_seq = (md * kl).sum(dim=1)
    reward_w, reward_l = reward_seq.chunk(2)
    kl_w, kl_l = kl_seq.chunk(2)
    if objective == "tdpo2":
        z = reward_w - reward_l + tdpo_alpha * (kl_w.detach() - kl_l)
    else:
        z = reward_w - reward_l + kl_w - kl_l
    loss = F.softplus(-beta * z)
    scale = 0.5 if shared_mask else 1.0
    if reward_mask is not None and l1_reward:
        loss = loss + scale * l1_reward * sum(mu.chunk(2)).sum(dim=1)
    if kl_mask is not None and l1_kl:
        loss = loss + scale * l1_kl * sum(md.chunk(2)).sum(dim=1)
    rw, rl = (beta * reward_w).detach(), (beta * reward_l).detach()
    metrics = {
        "rewards/chosen": rw,
        "rewards/rejected": rl,
        "rewards/margins": rw - rl,
        "rewards/accuracies": (rw > rl).float(),
        "kl/chosen": kl_w.detach(),
        "kl/rejected": kl_l.detach(),
        "z": z.detach(),
    }
    return loss, metrics


def mask_statistics(
    mask: Tensor, completion_mask: Tensor, decisive: Tensor | None = None
) -> Mapping[str, Tensor]:
    """Sums for logging a token mask over completion tokens (detached scalars, to be summed across batches):
    ``n`` tokens, ``zeros`` (exact zeros: the sparsity numerator), ``sum``; with ``decisive`` (bool, same
    shape) also ``decisive_sum``/``decisive_n`` and ``other_sum``/``other_n``."""
    cm = completion_mask.to(torch.bool)
    m = mask.detach().float()
    out = {"n": cm.sum().float(), "zeros": ((m == 0) & cm).sum().float(), "sum": (m * cm).sum()}
    if decisive is not None:
        d = decisive.to(torch.bool) & cm
        o = cm & ~d
        out |= {
            "decisive_sum": (m * d).sum(),
            "decisive_n": d.sum().float(),
            "other_sum": (m * o).sum(),
            "other_n": o.sum().float(),
        }
    return out
