"""D2O: distributional dispreference optimisation, training on negatives only (Findings of EMNLP 2024).

Source: Duan et al., "Negating Negatives: Alignment with Human Negative Samples via Distributional
Dispreference Optimization", Findings of EMNLP 2024; conventions: `docs/objectives.md` §5.

For prompt x with a human-dispreferred completion y_l and K completions y_1..y_K sampled ONCE from
the frozen reference, with sequence log-ratios ℓ(y) = log π(y|x) − log π_ref(y|x) (summed over the
completion tokens):

    z = (β/K) Σ_k ℓ(y_k) − α ℓ(y_l),      L = −log σ(z) = softplus(−z)

K = 11, α = β = 0.1 in the paper's main runs. The self-samples term keeps π close to π_ref where
π_ref puts its mass (the paper's implicit Jeffreys-divergence regularisation) while α ℓ(y_l) pushes
the negative down. Numerics: log-probabilities are upcast to ≥ fp32 before subtracting and the loss
is a softplus, so loss and gradient are finite for |ℓ| up to 1e3 (and beyond) in fp32 and bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def d2o_loss(
    policy_samples_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_samples_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-prompt D2O loss −log σ((β/K) Σ_k ℓ(y_k) − α ℓ(y_l)) (see the module docstring).

    Args:
        policy_samples_logps, ref_samples_logps: (B, K) sequence log-probabilities of the K reference
            samples under π and π_ref.
        policy_rejected_logps, ref_rejected_logps: (B,) sequence log-probabilities of the negative y_l.
        beta: β, the weight of the mean self-sample log-ratio.
        alpha: α, the weight of the negative's log-ratio.

    Returns:
        (loss, metrics): `loss` (B,) in ≥ fp32; metrics (detached (B,)): `d2o/samples_logratio`
        (mean_k ℓ(y_k)), `d2o/rejected_logratio` (ℓ(y_l)), `d2o/margin` (z) and `d2o/accuracy`
        (z > 0).
    """
    if policy_samples_logps.dim() != 2 or ref_samples_logps.shape != policy_samples_logps.shape:
        raise ValueError(
            "policy_samples_logps and ref_samples_logps must both be (B, K); got "
            f"{tuple(policy_samples_logps.shape)} and {tuple(ref_samples_logps.shape)}"
        )
    batch, k = policy_samples_logps.shape
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if k < 1:
        raise ValueError("D2O needs at least one reference sample per prompt (K ≥ 1)")
    if not beta > 0 or not alpha > 0:
        raise ValueError(f"D2O needs beta > 0 and alpha > 0, got beta={beta}, alpha={alpha}")
    samples_logr = _upcast(policy_samples_logps) - _upcast(ref_samples_logps).detach()
    rejected_logr = _upcast(policy_rejected_logps) - _upcast(ref_rejected_logps).detach()
    mean_samples = samples_logr.mean(dim=1)
    z = beta * mean_samples - alpha * rejected_logr
    loss = F.softplus(-z)
    with torch.no_grad():
        metrics = {
            "d2o/samples_logratio": mean_samples.detach(),
            "d2o/rejected_logratio": rejected_logr.detach(),
            "d2o/margin": z.detach(),
            "d2o/accuracy": (z.detach() > 0).to(z.dtype),
        }
    return loss, metrics
