"""Numerical building blocks shared by every divergence: accurate series near ℓ = 0, the
per-dtype safe range of ℓ, and the counter of saturation (clamp) events.

Conventions (see ``docs/objectives.md`` §0): every generator is evaluated from the
log-ratio ℓ = log π − log π_ref, never from u = e^ℓ directly.

Saturation policy
-----------------
A divergence method (``f``, ``f_prime``, ...) is evaluated exactly wherever its value AND its
derivative with respect to ℓ are at most ``finfo(dtype).max / 16`` in magnitude (the *safe range*,
``SAFE_FRACTION``). That set is an interval ``[lo, hi]`` of ℓ, found once per (divergence, method,
dtype) by bisection on the method itself in float64 and cached. Outside it ℓ is clamped to the
interval, so the value saturates at a large finite number (≈ ±max/16 or smaller) and the gradient
through the clamp is 0: never an inf, never a NaN. |ℓ| is in any case capped at ``LOGR_CAP`` = 1e6
(so ℓ = ±inf, e.g. log 0, is treated as ±1e6). Each clamped element is counted (no device sync) in
a module-level counter readable with :func:`saturation_counts` and logged by
:func:`report_saturation` through ``logging.getLogger("fdpo.divergences")``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

logger = logging.getLogger("fdpo.divergences")

#: Values and derivatives are exact up to ``finfo(dtype).max * SAFE_FRACTION``; beyond, ℓ is clamped.
SAFE_FRACTION = 1.0 / 16.0
#: |ℓ| never exceeds this (``log 0 = -inf`` becomes ``-LOGR_CAP``).
LOGR_CAP = 1.0e6
#: Below |x| < SERIES_RADIUS the helpers below switch to their Taylor series.
SERIES_RADIUS = 0.5

# Number of Taylor terms giving full precision for |x| <= SERIES_RADIUS (checked in the tests
# against mpmath): the tail after k terms is below (k+1) 0.5^k / (k+1)! relative.
_SERIES_TERMS = {torch.float64: 18, torch.float32: 10}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else (bf16, fp16) runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _horner(x: Tensor, coeffs: list[float]) -> Tensor:
    """Σ_k coeffs[k] x^k, coefficients from degree 0 upwards."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def series_switch(
    x: Tensor, series: Callable[[Tensor], Tensor], direct: Callable[[Tensor], Tensor]
) -> Tensor:
    """``series(x)`` where |x| < SERIES_RADIUS, else ``direct(x)``.

    Each branch only ever sees inputs from its own region (the other elements are replaced by a
    harmless constant), so a non-finite value or gradient in the branch not taken cannot leak
    through ``torch.where`` into the result or its gradient.
    """
    small = x.abs() < SERIES_RADIUS
    xs = torch.where(small, x, torch.zeros_like(x))
    xd = torch.where(small, torch.full_like(x, SERIES_RADIUS), x)
    return torch.where(small, series(xs), direct(xd))


def exp_m1_mx(x: Tensor) -> Tensor:
    """φ(x) = e^x − 1 − x ≥ 0, accurate for every x (series Σ_{k≥2} x^k/k! near 0).

    φ(ℓ) is the normalised forward-KL generator u − 1 − log u, and φ(−ℓ) is the k3 estimator.
    """
    n = _SERIES_TERMS[x.dtype]
    coeffs = [0.0, 0.0] + [1.0 / math.factorial(k) for k in range(2, n + 1)]
    return series_switch(x, lambda s: _horner(s, coeffs), lambda d: torch.expm1(d) - d)


def x_exp_m_expm1(x: Tensor) -> Tensor:
    """ψ(x) = x e^x − (e^x − 1) ≥ 0, accurate for every x (series Σ_{k≥2} (k−1) x^k/k! near 0).

    ψ(ℓ) is the normalised reverse-KL generator u log u − u + 1.
    """
    n = _SERIES_TERMS[x.dtype]
    coeffs = [0.0, 0.0] + [(k - 1) / math.factorial(k) for k in range(2, n + 1)]
    return series_switch(x, lambda s: _horner(s, coeffs), lambda d: d * torch.exp(d) - torch.expm1(d))


def alpha_series_coefficients(alpha: float, n: int) -> list[float]:
    """Taylor coefficients in ℓ of the α generator f(e^ℓ) = Σ_{k≥2} (Σ_{j=0}^{k−2} (1−α)^j) ℓ^k / k!."""
    a = 1.0 - alpha
    coeffs = [0.0, 0.0]
    for k in range(2, n + 1):
        coeffs.append(sum(a**j for j in range(k - 1)) / math.factorial(k))
    return coeffs


def series_terms(dtype: torch.dtype) -> int:
    return _SERIES_TERMS[dtype]


# ---------------------------------------------------------------------------------------------
# Safe range of ℓ per (method, dtype)
# ---------------------------------------------------------------------------------------------


def _acceptable(fn: Callable[[Tensor], Tensor], xs: Tensor, limit: float) -> Tensor:
    """Elementwise: value and d value/dℓ (autograd, in the dtype of ``xs``) finite and ≤ ``limit``."""
    x = xs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        if y.requires_grad:
            (g,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
        else:
            g = None
    ok = torch.isfinite(y) & (y.abs() <= limit)
    if g is not None:
        ok &= torch.isfinite(g) & (g.abs() <= limit)
    return ok.detach()


def _search_bound(fn: Callable[[Tensor], Tensor], sign: float, limit: float, dtype: torch.dtype) -> float:
    """Largest t in [0, LOGR_CAP] with fn acceptable on sign·t in ``dtype`` (assumes the acceptable
    set is an interval containing 0)."""
    if bool(_acceptable(fn, torch.tensor([sign * LOGR_CAP], dtype=dtype), limit)[0]):
        return LOGR_CAP
    # a coarse logarithmic scan first (the bound is usually between 1 and 1e3), then linear refinement
    grid = torch.logspace(-3, math.log10(LOGR_CAP), 200, dtype=torch.float64)
    ok = _acceptable(fn, (sign * grid).to(dtype), limit)
    if not bool(ok[0]):
        raise ValueError("divergence method is not finite near ℓ = 0")
    first_bad = int((~ok).nonzero()[0, 0])
    good, bad = float(grid[first_bad - 1]), float(grid[first_bad])
    for _ in range(12):
        grid = torch.linspace(good, bad, 65, dtype=torch.float64).to(dtype).double()
        ok = _acceptable(fn, (sign * grid).to(dtype), limit)
        idx = int((~ok).nonzero()[0, 0]) if bool((~ok).any()) else 64
        good, bad = float(grid[max(idx - 1, 0)]), float(grid[min(idx, 64)])
        if bad - good <= 1e-12 * max(1.0, good):
            break
    return good


@cache
def safe_range(fn: Callable[[Tensor], Tensor], dtype: torch.dtype) -> tuple[float, float]:
    """The interval [lo, hi] of ℓ where ``fn`` and its autograd derivative, computed in
    ``compute_dtype(dtype)``, are finite and within finfo(dtype).max·SAFE_FRACTION.

    ``fn`` must be a hashable callable (a bound method of a frozen dataclass) evaluating the math
    without any clamp. Found by a scan plus refinement, once per (fn, dtype), then cached.
    """
    limit = torch.finfo(dtype).max * SAFE_FRACTION
    cdtype = compute_dtype(dtype)
    hi = _search_bound(fn, 1.0, limit, cdtype)
    lo = -_search_bound(fn, -1.0, limit, cdtype)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Saturation counter
# ---------------------------------------------------------------------------------------------


class SaturationCounter:
    """Counts elements whose ℓ was clamped, per ``"<label>.<method>"`` key, without a device sync.

    Counts are kept as device tensors and only turned into Python ints by :meth:`snapshot`.
    Counting is skipped while tracing/compiling and can be disabled with ``enabled = False``.
    """

    def __init__(self) -> None:
        self.enabled = True
        self._counts: dict[str, Tensor] = {}

    def record(self, key: str, x: Tensor, lo: float, hi: float) -> None:
        if not self.enabled or torch.compiler.is_compiling():
            return
        with torch.no_grad():
            n = ((x < lo) | (x > hi)).sum()
        prev = self._counts.get(key)
        self._counts[key] = n if prev is None or prev.device != n.device else prev + n

    def snapshot(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._counts.items() if int(v) > 0}

    def reset(self) -> None:
        self._counts.clear()


SATURATION = SaturationCounter()


def saturation_counts() -> dict[str, int]:
    """Number of elements clamped so far, per ``"<divergence label>.<method>"`` (syncs the device)."""
    return SATURATION.snapshot()


def reset_saturation_counts() -> None:
    SATURATION.reset()


def set_saturation_tracking(enabled: bool) -> None:
    """Turn the (cheap, sync-free) counting of clamp events on or off."""
    SATURATION.enabled = enabled


def report_saturation(reset: bool = True) -> dict[str, int]:
    """Log (WARNING, logger ``fdpo.divergences``) and return the clamp counts since the last reset."""
    counts = SATURATION.snapshot()
    if counts:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        logger.warning(
            "log-ratios outside the representable range were clamped (values saturated, gradient 0 "
            "there): %s",
            detail,
        )
    if reset:
        SATURATION.reset()
    return counts
