"""Divergence penalties of RLVR / GRPO on rollouts: which estimator, which gradient (docs/objectives.md §1, §6).

GRPO samples completions y ∼ π_old (= π on-policy) and regularises η·D_f(π ‖ π_ref) per completion
token. With ℓ_t = log π(y_t) − log π_ref(y_t), u_t = e^{ℓ_t}, ω_t = π(y_t)/π_old(y_t) (1 in value on
policy, its gradient is the score function ∇log π), the estimators are (per token, then reduced with
the policy loss's own token weights):

==========  ==============================  =================  =====================================
estimator   per-token term                  value estimates    expected gradient of the term
==========  ==============================  =================  =====================================
k1_reward   r ← r − η Σ_t ℓ_t (in reward)   KL(π‖π_ref)         ∇KL(π‖π_ref) (REINFORCE on −k1)
k2          ½ ℓ²                            biased, ≥ 0        ∇KL(π‖π_ref)
k3          e^{−ℓ} − 1 + ℓ                  KL(π‖π_ref)         ∇KL(π_ref‖π)  (forward KL!)
k3_ratio    ω·(e^{−ℓ} − 1 + ℓ)  (TRL 1.16)  KL(π‖π_ref)         ∇KL(π‖π_ref)
k3_plus     ½ℓ² + sg(k3 − ½ℓ²)              KL(π‖π_ref)         ∇KL(π‖π_ref)  (k3's value, k2's gradient)
generator   ω·f̃(u)/u,  f̃ = f − f′(1)(u−1)   D_f(π‖π_ref)       ∇D_f(π‖π_ref)
full_vocab  Σ_v π_ref f(π/π_ref) exactly    D_f(π‖π_ref)       ∇D_f(π‖π_ref) (exact, no sampling)
==========  ==============================  =================  =====================================

k1 used as a LOSS has expected gradient E_π[∇log π] = 0 (it regularises nothing), hence ``k1_reward``:
the sequence k1 is folded into the reward before the group advantages (the PPO-RLHF way). k2, k3,
k3_ratio, k3_plus and k1_reward estimate the reverse KL only; ``generator`` and ``full_vocab`` take any registered f.
For ``generator`` with reverse KL, ω·f̃(u)/u is exactly k3_ratio.

Gradients are per position: the divergence of each next-token distribution with its prefix held
fixed (the same convention as TRL's k3). The tests check every row against the autograd gradient of
the exact divergence by enumeration over a small vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from trl.trainer.utils import nanstd

from fdpo.divergences import (
    Divergence,
    kl_k2,
    kl_k3,
    kl_k3_importance_weighted,
    kl_k3_plus,
    policy_sample_generator_loss,
    resolve_divergence,
)


@dataclass(frozen=True)
class EstimatorInfo:
    """What one estimator needs and which gradient it follows (see the module table)."""

    name: str
    reverse_kl_only: bool
    in_reward: bool
    needs_logits: bool
    value: str
    gradient: str


ESTIMATORS: dict[str, EstimatorInfo] = {
    e.name: e
    for e in (
        EstimatorInfo("k1_reward", True, True, False, "KL(π‖π_ref), unbiased", "∇KL(π‖π_ref) via the advantage"),
        EstimatorInfo("k2", True, False, False, "½ℓ², biased ≥ 0", "∇KL(π‖π_ref)"),
        EstimatorInfo("k3", True, False, False, "KL(π‖π_ref), unbiased", "∇KL(π_ref‖π) (forward KL)"),
        EstimatorInfo("k3_ratio", True, False, False, "KL(π‖π_ref), unbiased", "∇KL(π‖π_ref)"),
        EstimatorInfo("k3_plus", True, False, False, "KL(π‖π_ref), unbiased ≥ 0 (k3)", "∇KL(π‖π_ref) (k2's)"),
        EstimatorInfo("generator", False, False, False, "D_f(π‖π_ref), unbiased", "∇D_f(π‖π_ref)"),
        EstimatorInfo("full_vocab", False, False, True, "D_f(π‖π_ref), exact", "∇D_f(π‖π_ref), exact"),
    )
}


def check_estimator(estimator: str, divergence: str | Divergence) -> Divergence:
    """The resolved divergence, or ValueError naming the keys `estimator` / `divergence` and a fix."""
    if estimator not in ESTIMATORS:
        import difflib

        hint = difflib.get_close_matches(estimator, list(ESTIMATORS), n=1)
        raise ValueError(
            f"key 'estimator' is {estimator!r}; valid: {list(ESTIMATORS)}"
            + (f". Did you mean {hint[0]!r}?" if hint else ".")
        )
    div = resolve_divergence(divergence)
    if not isinstance(div, Divergence):
        raise ValueError(f"key 'divergence' = {divergence!r} is not an f-divergence of fdpo's registry")
    if ESTIMATORS[estimator].reverse_kl_only and div.canonical != "reverse_kl":
        raise ValueError(
            f"key 'estimator' = {estimator!r} estimates the reverse KL only, but key 'divergence' is "
            f"{div.label!r}. Use `estimator: generator` (unbiased on rollouts) or `estimator: full_vocab` "
            "(exact) for other divergences."
        )
    return div


def per_token_penalty(
    estimator: str,
    divergence: str | Divergence,
    logp: Tensor,
    ref_logp: Tensor,
    old_logp: Tensor | None = None,
) -> Tensor:
    """Per-token penalty term of a loss-side estimator (k2, k3, k3_ratio, k3_plus, generator) on rollouts.

    ``logp`` = log π(y_t) with gradient, ``ref_logp`` = log π_ref(y_t), ``old_logp`` = log π_old(y_t) of the
    sampling policy (None: on-policy, ω = exp(logp − sg(logp)) = 1 with the score-function gradient).
    """
    if estimator == "k2":
        return kl_k2(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    if estimator == "k3_plus":
        return kl_k3_plus(logp, ref_logp)
    old = logp.detach() if old_logp is None else old_logp
    if estimator == "k3_ratio":
        return kl_k3_importance_weighted(logp, ref_logp, old)
    if estimator == "generator":
        return policy_sample_generator_loss(logp, ref_logp, divergence, old_logp=old, normalized=True)
    raise ValueError(
        f"per_token_penalty: {estimator!r} is not a loss-side estimator (k2, k3, k3_ratio, k3_plus, generator)"
    )


def sequence_k1(old_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Σ_t (log π_old(y_t) − log π_ref(y_t)) over completion tokens: the k1 sequence KL of each rollout."""
    dtype = torch.promote_types(torch.promote_types(old_logp.dtype, ref_logp.dtype), torch.float32)
    lr = (old_logp.detach().to(dtype) - ref_logp.detach().to(dtype)) * mask
    return lr.sum(-1)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str) -> Tensor:
    """GRPO advantages of TRL 1.16 (`multi_objective_aggregation='sum_then_normalize'`).

    A_i = r_i − mean_group(r), divided by (std + 1e-4) where std is the group's (``scale_rewards='group'``)
    or the batch's (``'batch'``) unbiased standard deviation; ``'none'`` does not scale. NaN rewards
    (unscorable completions) are left out of the statistics and get advantage 0, as in TRL.
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    adv = (grouped - mean).view(-1)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1 else None
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else None
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if scale_rewards != "none":
        adv = adv / ((std if std is not None else torch.zeros_like(adv)) + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)

