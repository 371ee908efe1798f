"""The :class:`Divergence` type: one f-divergence D_f(π ‖ π_ref) = Σ_v π_ref(v) f(π(v)/π_ref(v)).

Every method takes the log-ratio ℓ = log π − log π_ref (a tensor of any shape, float32, bfloat16,
float16 or float64) and returns a tensor of the same shape and dtype:

=======================  ==========================  ==============================================
method                   value                       used by
=======================  ==========================  ==============================================
``f(ℓ)``                 f(u), u = e^ℓ               reference-sample (DPH-RL) losses, tests
``f_prime(ℓ)``           f′(u)                       f-DPO (docs/objectives.md §3)
``f_over_u(ℓ)``          f(u)/u                      policy-sample generator estimator E_π[f(u)/u]
``u_f_prime(ℓ)``         u f′(u) = d f(e^ℓ)/dℓ
``f_normalized(ℓ)``      f(u) − f′(1)(u − 1) ≥ 0     same divergence, lower-variance sample losses
``f_normalized_over_u``  [f(u) − f′(1)(u − 1)]/u     k3 is this for reverse KL
=======================  ==========================  ==============================================

Numerics: bfloat16/float16 inputs are upcast to float32 internally and the result is cast back to
the input dtype; float32 and float64 are computed in their own precision. Only expm1, log1p,
softplus, logsigmoid, logaddexp and series near ℓ = 0 are used, so results are accurate (relative
error ~1e-6 in float32) wherever the value is representable, and the clamp policy of
:mod:`fdpo.divergences.numerics` applies beyond: values saturate, gradients there are 0, never NaN.
A NaN input gives a NaN output.

Adding a divergence = one subclass (a frozen dataclass whose fields are its parameters) decorated
with :func:`fdpo.divergences.registry.register`, defining ``_f`` and ``_f_prime`` (and, for better
behaviour at extreme ℓ or speed over a full vocabulary, ``_f_over_u``, ``_u_f_prime``,
``vocab_value``, ``vocab_dlogp``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor

from fdpo.divergences.numerics import SATURATION, compute_dtype, safe_range

#: log-probabilities are floored here in the full-vocabulary path (log 0 = -inf would give 0·inf).
LOG_ZERO = -1.0e4

_METHODS = ("f", "f_prime", "f_over_u", "u_f_prime", "f_normalized", "f_normalized_over_u")


class VocabChunk:
    """Per-chunk log-probabilities of both distributions over the vocabulary, with lazily cached p, q.

    ``logp``/``logq``: (rows, vocab) log π and log π_ref, floored at :data:`LOG_ZERO`.
    ``log_cap``: each per-token term of the full-vocabulary sum is kept below e^log_cap in
    magnitude, so that a row sum over the vocabulary cannot overflow.
    """

    def __init__(self, logp: Tensor, logq: Tensor, log_cap: float) -> None:
        self.logp = logp
        self.logq = logq
        self.log_cap = log_cap
        self._memo: dict[Any, Tensor] = {}

    def memo(self, key: Any, compute: Callable[[], Tensor]) -> Tensor:
        """A per-chunk intermediate shared by vocab_value and vocab_dlogp (computed once)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @cached_property
    def p(self) -> Tensor:
        return self.logp.exp()

    @cached_property
    def q(self) -> Tensor:
        return self.logq.exp()

    @cached_property
    def logr(self) -> Tensor:
        return self.logp - self.logq

    @property
    def cap(self) -> float:
        return math.exp(self.log_cap)


@dataclass(frozen=True)
class Divergence(ABC):
    """One registered f-divergence (frozen; its dataclass fields are its parameters).

    Class-level metadata (documented once per entry):

    - ``canonical``: the one name logged everywhere; ``aliases``: other accepted names.
    - ``formula`` / ``f_prime_formula``: one-line f(u) and f′(u); ``equals``: what D_f(π‖π_ref) is.
    - ``f_dpo_valid``: f′ strictly increasing (invertible) and f′(u) → −∞ as u → 0 (0 ∉ dom f′),
      the f-DPO condition (docs/objectives.md §3).
    - ``mass_covering``: NOT mode-seeking. A divergence is mode-seeking when it is zero-forcing,
      f*(0) = lim_{u→∞} f(u)/u = ∞ (π pays without bound for mass where π_ref has none, so it
      hides inside one mode), unless it is also zero-avoiding, f(0⁺) = ∞ (π pays without bound
      for dropping π_ref's mass). Hence reverse KL and Pearson χ² are the mode-seeking entries
      (the tests check each flag against the two limits).
    - ``source``: where the formula comes from.
    - ``fdpo_score_scale``: the factor c_f by which the f-DPO score (docs/objectives.md §3) multiplies
      this entry's f′: s(ℓ) = c_f (f′(e^ℓ) − f′(1)). 1.0 (the registry's f′) except where the
      f-DPO paper writes the generator at another scale than the registry: ``js`` has 2.0,
      because §3's JS score β(log σ(ℓ_w) − log σ(ℓ_l)) is twice the registry's ½-JS f′
      (``generalized_jsd(0.5)`` keeps 1.0: the same divergence, half the score).
    - ``dph_generator_scale``: the factor s_f between the per-sample value DPH-RL optimises in its
      rehearsal term and this entry's f̃ (docs/objectives.md §7): 1.0 except ``js``, 2.0, since the
      DPH-RL paper writes the JS generator without the registry's ½.
    """

    canonical: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    formula: ClassVar[str]
    f_prime_formula: ClassVar[str]
    equals: ClassVar[str]
    f_dpo_valid: ClassVar[bool]
    mass_covering: ClassVar[bool]
    source: ClassVar[str] = "docs/objectives.md §0"
    fdpo_score_scale: ClassVar[float] = 1.0
    dph_generator_scale: ClassVar[float] = 1.0
    notes: ClassVar[str] = ""

    # -- parameters ----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for fld in dataclasses.fields(self):
            if not fld.init:
                continue
            value = getattr(self, fld.name)
            spec = fld.metadata.get("range")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"divergence '{self.canonical}': parameter '{fld.name}' must be a number, got {value!r}"
                )
            if not math.isfinite(value):
                raise ValueError(f"divergence '{self.canonical}': parameter '{fld.name}' must be finite")
            if spec is not None:
                lo, hi = spec
                if not lo < value < hi:
                    raise ValueError(
                        f"divergence '{self.canonical}': parameter '{fld.name}' must be in the open "
                        f"interval ({lo:g}, {hi:g}), got {value!r}. {fld.metadata.get('help', '')}".rstrip()
                    )
            object.__setattr__(self, fld.name, float(value))

    @classmethod
    def parameter_specs(cls) -> dict[str, dict[str, Any]]:
        """{name: {"range": (lo, hi), "help": str, "required": bool}} of the settable parameters."""
        out = {}
        for fld in dataclasses.fields(cls):
            if fld.init:
                required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
                out[fld.name] = {**fld.metadata, "required": required}
        return out

    @property
    def params(self) -> dict[str, float]:
        return {fld.name: getattr(self, fld.name) for fld in dataclasses.fields(self) if fld.init}

    @property
    def label(self) -> str:
        """Name for logs, e.g. ``reverse_kl`` or ``alpha(0.5)``; ``get_divergence(label)`` rebuilds it."""
        params = self.params
        if not params:
            return self.canonical
        if len(params) == 1:
            return f"{self.canonical}({next(iter(params.values())):g})"
        return f"{self.canonical}(" + ",".join(f"{k}={v:g}" for k, v in params.items()) + ")"

    def __repr__(self) -> str:
        return f"Divergence<{self.label}>"

    @cached_property
    def f_prime_at_one(self) -> float:
        """f′(1), subtracted by the normalised generator f̃(u) = f(u) − f′(1)(u − 1)."""
        return float(self._f_prime(torch.zeros(1, dtype=torch.float64))[0])

    # -- the math, on float32/float64 ℓ already clamped to the safe range -----------------------

    @abstractmethod
    def _f(self, logr: Tensor) -> Tensor:
        """f(e^ℓ)."""

    @abstractmethod
    def _f_prime(self, logr: Tensor) -> Tensor:
        """f′(e^ℓ)."""

    def _f_over_u(self, logr: Tensor) -> Tensor:
        """f(e^ℓ) e^{−ℓ} (override for a form that does not overflow)."""
        return self._f(logr) * torch.exp(-logr)

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        """e^ℓ f′(e^ℓ) (override for a form that does not overflow)."""
        return torch.exp(logr) * self._f_prime(logr)

    def _f_normalized(self, logr: Tensor) -> Tensor:
        c = self.f_prime_at_one
        return self._f(logr) if c == 0.0 else self._f(logr) - c * torch.expm1(logr)

    def _f_normalized_over_u(self, logr: Tensor) -> Tensor:
        c = self.f_prime_at_one
        return self._f_over_u(logr) if c == 0.0 else self._f_over_u(logr) + c * torch.expm1(-logr)

    # -- public, dtype-handling, clamped evaluation ------------------------------------------

    def _evaluate(self, method: str, logr: Tensor) -> Tensor:
        if not isinstance(logr, Tensor) or not logr.is_floating_point():
            raise TypeError(f"{self.label}.{method} expects a floating-point tensor of log-ratios")
        out_dtype = logr.dtype
        x = logr.to(compute_dtype(out_dtype))
        raw = getattr(self, "_" + method)
        lo, hi = safe_range(raw, out_dtype)
        SATURATION.record(f"{self.label}.{method}", x, lo, hi)
        y = raw(x.clamp(lo, hi))
        return y.to(out_dtype)

    def f(self, logr: Tensor) -> Tensor:
        """f(u) at u = e^ℓ."""
        return self._evaluate("f", logr)

    def f_prime(self, logr: Tensor) -> Tensor:
        """f′(u) at u = e^ℓ."""
        return self._evaluate("f_prime", logr)

    def f_over_u(self, logr: Tensor) -> Tensor:
        """f(u)/u at u = e^ℓ: E_π[f(u)/u] = D_f(π‖π_ref) (policy-sample generator)."""
        return self._evaluate("f_over_u", logr)

    def u_f_prime(self, logr: Tensor) -> Tensor:
        """u f′(u) at u = e^ℓ, the derivative of f(e^ℓ) with respect to ℓ."""
        return self._evaluate("u_f_prime", logr)

    def f_normalized(self, logr: Tensor) -> Tensor:
        """f̃(u) = f(u) − f′(1)(u − 1) ≥ 0: the same divergence (Σ_v π_ref(u − 1) = 0) and gradient."""
        return self._evaluate("f_normalized", logr)

    def f_normalized_over_u(self, logr: Tensor) -> Tensor:
        """f̃(u)/u (for reverse KL this is the k3 estimator r − 1 − log r, r = 1/u)."""
        return self._evaluate("f_normalized_over_u", logr)

    def safe_logr_range(self, method: str = "f", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
        """The interval of ℓ where ``method`` is evaluated exactly in ``dtype`` (clamped beyond)."""
        if method not in _METHODS:
            raise ValueError(f"unknown method {method!r}; one of {_METHODS}")
        return safe_range(getattr(self, "_" + method), dtype)

    # -- full-vocabulary terms (see full_vocab.py) ---------------------------------------------

    def vocab_value(self, c: VocabChunk) -> Tensor:
        """Per-token terms q_v f(p_v/q_v) whose sum over v is D_f (rows, vocab).

        Generic version: q·f(u) where u ≤ 1 and p·f(u)/u where u > 1, so that neither a tiny q
        times a huge f nor a tiny p times a huge f/u is ever formed; terms capped at e^log_cap.
        """
        logr = c.logr
        below = logr <= 0
        terms = torch.where(below, c.q * self.f(logr), c.p * self.f_over_u(logr))
        return terms.clamp(-c.cap, c.cap)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        """∂D_f/∂log p_v = p_v f′(p_v/q_v) (rows, vocab), the gradient w.r.t. the log-probabilities.

        (∂D_f/∂log q_v = q_v f(u_v) − p_v f′(u_v) = vocab_value − vocab_dlogp.)
        Generic version: p·f′(u) where u ≥ 1 and q·u f′(u) where u < 1; capped at e^log_cap.
        """
        logr = c.logr
        above = logr >= 0
        terms = torch.where(above, c.p * self.f_prime(logr), c.q * self.u_f_prime(logr))
        return terms.clamp(-c.cap, c.cap)
