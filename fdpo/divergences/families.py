"""Math shared by families of registry entries (fdpo/divergences/entries.py; docs/objectives.md §0).

- :class:`JSDFamily`: the generalised Jensen–Shannon divergence JSD(β) (``js`` is β = ½ and
  ``generalized_jsd`` takes β), evaluated through the log-mixture log(β u + 1 − β) stably in ℓ;
- :func:`alpha_f`: the α-divergence generator f_α(e^ℓ), with its series near ℓ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from fdpo.divergences.base import Divergence, VocabChunk
from fdpo.divergences.numerics import (
    _horner,
    alpha_series_coefficients,
    exp_m1_mx,
    series_switch,
    series_terms,
    x_exp_m_expm1,
)

FROZEN_ENTRY = {"frozen": True, "repr": False}

_JSD_SWITCH = 30.0


def _log_mix(logr: Tensor, beta: float) -> Tensor:
    """s = log(β e^ℓ + 1 − β), accurate for every ℓ (log1p form, or ℓ + log β + … for large ℓ)."""
    small = logr <= _JSD_SWITCH
    l1 = logr.clamp(max=_JSD_SWITCH)
    l2 = logr.clamp(min=_JSD_SWITCH)
    s1 = torch.log1p(beta * torch.expm1(l1))
    s2 = l2 + math.log(beta) + torch.log1p((1.0 - beta) / beta * torch.exp(-l2))
    return torch.where(small, s1, s2)


def _log_ratio_to_mix(logr: Tensor, beta: float) -> Tensor:
    """ρ = log(u/m) = −log(β + (1 − β) e^{−ℓ}), m = βu + 1 − β; accurate for every ℓ."""
    big = logr >= -_JSD_SWITCH
    l1 = logr.clamp(min=-_JSD_SWITCH)
    l2 = logr.clamp(max=-_JSD_SWITCH)
    r1 = -torch.log1p((1.0 - beta) * torch.expm1(-l1))
    r2 = l2 - math.log1p(-beta) - torch.log1p(beta / (1.0 - beta) * torch.exp(l2))
    return torch.where(big, r1, r2)


def _gjsd_f(logr: Tensor, beta: float) -> Tensor:
    """f_β(e^ℓ) = β u log u − m log m, m = βu + 1 − β, as the sum of two non-negative terms
    β m ψ(log(u/m)) + (1 − β) φ(log m), ψ(x) = x e^x − e^x + 1, φ(x) = e^x − 1 − x (no
    cancellation, and no intermediate larger than the value in the forward or backward pass)."""
    s = _log_mix(logr, beta)
    rho = _log_ratio_to_mix(logr, beta)
    return beta * torch.exp(s) * x_exp_m_expm1(rho) + (1.0 - beta) * exp_m1_mx(s)


@dataclass(**FROZEN_ENTRY)
class JSDFamily(Divergence):
    """Shared math of ``js`` and ``generalized_jsd``: f_β(u) = β u log u − (βu + 1 − β) log(βu + 1 − β),
    so D_f(π‖π_ref) = β KL(π ‖ m) + (1 − β) KL(π_ref ‖ m) with m = β π + (1 − β) π_ref.

    f′ = β log(u/m) (bounded above by −β log β, → −∞ as u → 0), f_β(u)/u = f_{1−β}(1/u).
    Full vocabulary: log m = logaddexp(log p + log β, log q + log(1 − β)),
    q f = β p (log p − log m) + (1 − β) q (log q − log m), p f′ = β p (log p − log m).
    """

    beta: ClassVar[float]
    f_dpo_valid = True
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return _gjsd_f(logr, self.beta)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return _gjsd_f(-logr, 1.0 - self.beta)

    def _f_prime(self, logr: Tensor) -> Tensor:
        return self.beta * _log_ratio_to_mix(logr, self.beta)

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return self.beta * torch.exp(logr) * _log_ratio_to_mix(logr, self.beta)

    def _log_m(self, c: VocabChunk) -> Tensor:
        def compute() -> Tensor:
            a = c.logp + math.log(self.beta)
            return torch.logaddexp(a, c.logq + math.log1p(-self.beta), out=a)

        return c.memo(("log_m", self.beta), compute)

    def vocab_value(self, c: VocabChunk) -> Tensor:
        log_m = self._log_m(c)
        t = torch.sub(c.logq, log_m).mul_(c.q).mul_(1.0 - self.beta)
        return torch.sub(c.logp, log_m).mul_(c.p).mul_(self.beta).add_(t)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return torch.sub(c.logp, self._log_m(c)).mul_(c.p).mul_(self.beta)


@lru_cache(maxsize=256)
def _alpha_coeffs(alpha: float, n: int) -> list[float]:
    return alpha_series_coefficients(alpha, n)


def alpha_f(logr: Tensor, alpha: float) -> Tensor:
    """f_α(e^ℓ) = ((1−α)u + α − u^{1−α}) / (α(1−α)) ≥ 0.

    Series Σ_{k≥2} (Σ_{j<k−1} (1−α)^j) ℓ^k/k! for |ℓ| < ½; otherwise, with a = 1 − α, the form
    without cancellation for the given α: [e^{aℓ} expm1(αℓ)/α − expm1(ℓ)]/a for α < ½ (→ u log u −
    u + 1 as α → 0) or [expm1(ℓ) − expm1(aℓ)/a]/α for α ≥ ½ (→ u − 1 − log u as α → 1).
    """
    a = 1.0 - alpha
    coeffs = _alpha_coeffs(alpha, series_terms(logr.dtype))
    if alpha < 0.5:

        def direct(x: Tensor) -> Tensor:
            return (torch.exp(a * x) * (torch.expm1(alpha * x) / alpha) - torch.expm1(x)) / a

    else:

        def direct(x: Tensor) -> Tensor:
            return (torch.expm1(x) - torch.expm1(a * x) / a) / alpha

    return series_switch(logr, lambda s: _horner(s, coeffs), direct)
