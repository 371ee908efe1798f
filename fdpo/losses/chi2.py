"""χ² occupancy-measure penalty of Correlated Proxies (ICLR 2025).

Source: Laidlaw, Singhal, Dragan, "Correlated Proxies: A New Definition and Improved Mitigation for
Reward Hacking", ICLR 2025; for LLMs as in its released code; conventions: `docs/objectives.md` §6.

On rollouts, with the sequence log-ratio L = Σ_t (log π(o_t) − log π_ref(o_t)) of each completion and
R = e^L,

    χ̂² = mean_batch g(L),     g(L) = R + 1/R − 2 = 2(cosh L − 1) = (e^{L/2} − e^{−L/2})²

(the symmetrised χ²-type term of the released code, ≥ 0, zero iff π = π_ref on the sample). g is
computed as (expm1(L/2) − expm1(−L/2))²: no cancellation near L = 0 (relative accuracy ~1e-7 in fp32
where R + 1/R − 2 would lose everything). Beyond |L| = `linear_beyond` (10, as released) g continues
linearly with the slope it has there (C¹):

    g(L) = g(c) + g′(c)(|L| − c),   g′(c) = 2 sinh c,   for |L| > c,

so the penalty and its gradient are finite for |L| = 1000 in fp32/bf16. With `sqrt=True` the penalty is
√max(χ̂², 1e-4) (the released code adds coeff·√max(χ̂², 1e-4) to the loss, coeff 0.0008 in their RLHF
run; the floor keeps the square root's gradient bounded, and the gradient is 0 below it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_LINEAR_BEYOND = 10.0
SQRT_FLOOR = 1e-4


def _g_exact(x: Tensor) -> Tensor:
    return (torch.expm1(0.5 * x) - torch.expm1(-0.5 * x)) ** 2


def chi2_terms(seq_log_ratio: Tensor, *, linear_beyond: float = DEFAULT_LINEAR_BEYOND) -> Tensor:
    """Per-sequence g(L) = e^L + e^{−L} − 2, linear (C¹) beyond |L| = `linear_beyond`; ≥ fp32."""
    if not linear_beyond > 0:
        raise ValueError(f"linear_beyond must be positive, got {linear_beyond}")
    x = seq_log_ratio.to(torch.promote_types(seq_log_ratio.dtype, torch.float32))
    c = float(linear_beyond)
    g_c = (math.expm1(0.5 * c) - math.expm1(-0.5 * c)) ** 2
    slope_c = 2.0 * math.sinh(c)
    inside = x.abs() <= c
    exact = _g_exact(x.clamp(-c, c))
    linear = g_c + slope_c * (x.abs() - c)
    return torch.where(inside, exact, linear)


def chi2_penalty(
    seq_log_ratio: Tensor,
    *,
    sqrt: bool = False,
    linear_beyond: float = DEFAULT_LINEAR_BEYOND,
) -> tuple[Tensor, dict[str, Tensor]]:
    """χ̂² = mean_batch g(L) (or √max(χ̂², 1e-4) with `sqrt`), formulas in the module docstring.

    Args:
        seq_log_ratio: (B,) L = Σ_t log π − log π_ref over each completion's tokens (with gradient).
        sqrt: return √max(χ̂², 1e-4) instead of χ̂².
        linear_beyond: |L| beyond which g is continued linearly (10 in the released code).

    Returns:
        (penalty, metrics): `penalty` 0-d (≥ fp32); metrics (detached): `div/chi2_occupancy` (χ̂²),
        `chi2/abs_log_ratio` (mean |L|), `chi2/frac_linear` (fraction of sequences with |L| beyond).
    """
    if seq_log_ratio.dim() != 1 or seq_log_ratio.numel() == 0:
        raise ValueError(
            f"seq_log_ratio must be a non-empty (B,) tensor, got shape {tuple(seq_log_ratio.shape)}"
        )
    terms = chi2_terms(seq_log_ratio, linear_beyond=linear_beyond)
    chi2 = terms.mean()
    penalty = torch.sqrt(chi2.clamp(min=SQRT_FLOOR)) if sqrt else chi2
    with torch.no_grad():
        absl = seq_log_ratio.detach().to(terms.dtype).abs()
        metrics = {
            "div/chi2_occupancy": chi2.detach(),
            "chi2/abs_log_ratio": absl.mean(),
            "chi2/frac_linear": (absl > linear_beyond).to(terms.dtype).mean(),
        }
    return penalty, metrics
