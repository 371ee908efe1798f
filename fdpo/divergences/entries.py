"""The registered f-divergences: one small class per entry (docs/objectives.md §0 table).

D_f(π ‖ π_ref) = Σ_v π_ref(v) f(u(v)), u = π/π_ref = e^ℓ. Each class gives f and f′ in log space
(plus the overflow-free forms f/u and u·f′, and closed forms of the per-token full-vocabulary terms
q·f(p/q) and p·f′(p/q) in terms of log p and log q). To add a divergence, add one class here
(math shared by a family of entries lives in families.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fdpo.divergences.base import Divergence, VocabChunk
from fdpo.divergences.families import FROZEN_ENTRY, JSDFamily, alpha_f
from fdpo.divergences.numerics import (
    exp_m1_mx,
    x_exp_m_expm1,
)
from fdpo.divergences.registry import register

# --------------------------------------------------------------------------------------------
# reverse KL and forward KL
# --------------------------------------------------------------------------------------------


@register
@dataclass(**FROZEN_ENTRY)
class ReverseKL(Divergence):
    """f(u) = u log u: D_f(π‖π_ref) = KL(π ‖ π_ref), the usual RLHF KL (mode-seeking).

    In ℓ: f = ℓ e^ℓ, f′ = ℓ + 1, f/u = ℓ, u f′ = e^ℓ(ℓ + 1); normalised f̃ = ψ(ℓ) = ℓe^ℓ − e^ℓ + 1.
    Full vocabulary: q f(u) = p (log p − log q), p f′(u) = p (log p − log q + 1).
    """

    canonical = "reverse_kl"
    aliases = ("kl", "rkl", "reverse_kld", "kl_reverse")
    formula = "u log u"
    f_prime_formula = "log u + 1"
    equals = "KL(π ‖ π_ref)"
    f_dpo_valid = True
    mass_covering = False

    def _f(self, logr: Tensor) -> Tensor:
        return logr * torch.exp(logr)

    def _f_prime(self, logr: Tensor) -> Tensor:
        return logr + 1.0

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return logr * 1.0

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return torch.exp(logr) * (logr + 1.0)

    def _f_normalized(self, logr: Tensor) -> Tensor:
        return x_exp_m_expm1(logr)

    def _f_normalized_over_u(self, logr: Tensor) -> Tensor:
        return exp_m1_mx(-logr)

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return c.p * c.logr

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return torch.add(c.logr, 1.0).mul_(c.p)


@register
@dataclass(**FROZEN_ENTRY)
class ForwardKL(Divergence):
    """f(u) = −log u: D_f(π‖π_ref) = KL(π_ref ‖ π) (mass-covering).

    In ℓ: f = −ℓ, f′ = −e^{−ℓ}, f/u = −ℓe^{−ℓ}, u f′ = −1; normalised f̃ = φ(ℓ) = e^ℓ − 1 − ℓ
    (the DPH-RL rehearsal loss u − log u − 1). Full vocabulary: q f(u) = q (log q − log p),
    p f′(u) = −q.
    """

    canonical = "forward_kl"
    aliases = ("fkl", "forward_kld", "kl_forward")
    formula = "−log u"
    f_prime_formula = "−1/u"
    equals = "KL(π_ref ‖ π)"
    f_dpo_valid = True
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return -logr

    def _f_prime(self, logr: Tensor) -> Tensor:
        return -torch.exp(-logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return -logr * torch.exp(-logr)

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return logr * 0.0 - 1.0

    def _f_normalized(self, logr: Tensor) -> Tensor:
        return exp_m1_mx(logr)

    def _f_normalized_over_u(self, logr: Tensor) -> Tensor:
        return x_exp_m_expm1(-logr)

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return torch.mul(c.q, c.logr).neg_()

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return -c.q


# --------------------------------------------------------------------------------------------
# Jensen–Shannon (λ = ½) and the generalised JSD(β)
# --------------------------------------------------------------------------------------------

@register
@dataclass(**FROZEN_ENTRY)
class JensenShannon(JSDFamily):
    """f(u) = ½[u log u − (1 + u) log((1 + u)/2)]: D_f = JS(π, π_ref) (natural log, ≤ log 2).

    Equal to ``generalized_jsd(beta=0.5)``. Some released code (DPH-RL) uses 2·JS; with a
    coefficient in front that only rescales it.
    """

    canonical = "js"
    aliases = ("jsd", "jensen_shannon")
    formula = "½[u log u − (1+u) log((1+u)/2)]"
    f_prime_formula = "½ log(2u/(1+u))"
    equals = "JS(π, π_ref) = ½KL(π‖m) + ½KL(π_ref‖m), m = (π+π_ref)/2"
    notes = "= generalized_jsd(0.5)"
    beta = 0.5
    fdpo_score_scale = 2.0  # §3: the f-DPO JS score is log σ(ℓ_w) − log σ(ℓ_l) = 2 × this f′'s margin
    dph_generator_scale = 2.0  # §7: DPH-RL's JS generator u log u − (u+1) log((u+1)/2) is 2 × this f̃


# --------------------------------------------------------------------------------------------
# α-divergence
# --------------------------------------------------------------------------------------------


@register
@dataclass(**FROZEN_ENTRY)
class Alpha(Divergence):
    """f(u) = (u^{1−α} − (1−α)u − α) / (α(α−1)), α ∈ (0, 1) in the f-DPO paper's convention.

    α → 0 gives reverse KL, α → 1 forward KL, α = ½ is 2·squared_hellinger. TRL ≥ 0.29 calls the
    coefficient ``f_alpha_divergence_coef = a`` with f′(u) = (u^{a−1} − 1)/(a − 1): a = 1 − α (use
    :meth:`from_trl_coef`). In ℓ: f′ = −expm1(−αℓ)/α, u f′ = e^{(1−α)ℓ} expm1(αℓ)/α,
    f_α(u)/u = f_{1−α}(1/u). Full vocabulary with w = p^{1−α} q^α:
    q f = ((1−α)p + αq − w)/(α(1−α)), p f′ = (p − w)/α.
    """

    alpha: float = field(
        metadata={
            "range": (0.0, 1.0),
            "help": "f-DPO convention (docs/objectives.md §0): α → 0 is reverse KL, α → 1 forward KL; "
            "TRL's f_alpha_divergence_coef a corresponds to alpha = 1 − a.",
        }
    )

    canonical = "alpha"
    aliases = ("alpha_divergence", "amari_alpha")
    formula = "(u^(1−α) − (1−α)u − α) / (α(α−1))"
    f_prime_formula = "(1 − u^(−α)) / α"
    equals = "α-divergence (α→0: KL(π‖π_ref), α→1: KL(π_ref‖π))"
    f_dpo_valid = True
    mass_covering = True
    source = "docs/objectives.md §0; f-DPO (Wang et al., ICLR 2024)"

    @classmethod
    def from_trl_coef(cls, f_alpha_divergence_coef: float) -> Alpha:
        """The same divergence as TRL's ``f_alpha_divergence_coef = a`` (alpha = 1 − a)."""
        return cls(alpha=1.0 - f_alpha_divergence_coef)

    def _f(self, logr: Tensor) -> Tensor:
        return alpha_f(logr, self.alpha)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return alpha_f(-logr, 1.0 - self.alpha)

    def _f_prime(self, logr: Tensor) -> Tensor:
        return -torch.expm1(-self.alpha * logr) / self.alpha

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return torch.exp((1.0 - self.alpha) * logr) * torch.expm1(self.alpha * logr) / self.alpha

    def _w(self, c: VocabChunk) -> Tensor:
        """w = p^{1−α} q^α (a fresh tensor)."""
        return torch.mul(c.logp, 1.0 - self.alpha).add_(c.logq, alpha=self.alpha).exp_()

    def vocab_value(self, c: VocabChunk) -> Tensor:
        a = 1.0 - self.alpha
        return self._w(c).neg_().add_(c.p, alpha=a).add_(c.q, alpha=self.alpha).div_(self.alpha * a)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return self._w(c).neg_().add_(c.p).div_(self.alpha)


# --------------------------------------------------------------------------------------------
# Jeffreys, squared Hellinger, χ² (both directions), total variation
# --------------------------------------------------------------------------------------------


@register
@dataclass(**FROZEN_ENTRY)
class Jeffreys(Divergence):
    """f(u) = (u − 1) log u: D_f = KL(π‖π_ref) + KL(π_ref‖π) (the symmetric KL; D2O's implicit one).

    In ℓ: f = ℓ expm1(ℓ), f′ = ℓ − expm1(−ℓ), f/u = −ℓ expm1(−ℓ), u f′ = ℓe^ℓ + expm1(ℓ).
    Full vocabulary: q f = (p − q)(log p − log q), p f′ = p(log p − log q + 1) − q.
    """

    canonical = "jeffreys"
    aliases = ("jeffreys_kl", "symmetric_kl", "jeffrey")
    formula = "(u − 1) log u"
    f_prime_formula = "log u + 1 − 1/u"
    equals = "KL(π ‖ π_ref) + KL(π_ref ‖ π)"
    f_dpo_valid = True
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return logr * torch.expm1(logr)

    def _f_prime(self, logr: Tensor) -> Tensor:
        return logr - torch.expm1(-logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return -logr * torch.expm1(-logr)

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return logr * torch.exp(logr) + torch.expm1(logr)

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return torch.sub(c.p, c.q).mul_(c.logr)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return torch.add(c.logr, 1.0).mul_(c.p).sub_(c.q)


@register
@dataclass(**FROZEN_ENTRY)
class SquaredHellinger(Divergence):
    """f(u) = (√u − 1)²: D_f = Σ_v (√π − √π_ref)² = 2(1 − Σ_v √(π π_ref)) (no ½ in front).

    In ℓ: f = expm1(ℓ/2)², f′ = −expm1(−ℓ/2), f/u = expm1(−ℓ/2)², u f′ = e^{ℓ/2} expm1(ℓ/2).
    Full vocabulary with w = √(pq): q f = p + q − 2w, p f′ = p − w.
    """

    canonical = "squared_hellinger"
    aliases = ("hellinger", "hellinger2", "squared_hellinger_distance")
    formula = "(√u − 1)²"
    f_prime_formula = "1 − u^(−½)"
    equals = "Σ(√π − √π_ref)² = 2(1 − Σ√(π π_ref))"
    f_dpo_valid = True
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return torch.expm1(0.5 * logr) ** 2

    def _f_prime(self, logr: Tensor) -> Tensor:
        return -torch.expm1(-0.5 * logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return torch.expm1(-0.5 * logr) ** 2

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return torch.exp(0.5 * logr) * torch.expm1(0.5 * logr)

    @staticmethod
    def _w(c: VocabChunk) -> Tensor:
        """w = √(pq) (a fresh tensor)."""
        return torch.add(c.logp, c.logq).mul_(0.5).exp_()

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return self._w(c).mul_(-2.0).add_(c.p).add_(c.q)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return self._w(c).neg_().add_(c.p)


@register
@dataclass(**FROZEN_ENTRY)
class NeymanChi2(Divergence):
    """f(u) = (1 − u)²/u: D_f = χ²(π_ref ‖ π) = Σ_v (π − π_ref)²/π.

    In ℓ: f = −expm1(ℓ) expm1(−ℓ), f′ = −expm1(−2ℓ), f/u = expm1(−ℓ)², u f′ = expm1(ℓ) − expm1(−ℓ).
    Full vocabulary with w = q²/p (capped): q f = w − 2q + p, p f′ = p − w.
    """

    canonical = "neyman_chi2"
    aliases = ("neyman", "neyman_chi_squared")
    formula = "(1 − u)² / u"
    f_prime_formula = "1 − u^(−2)"
    equals = "χ²(π_ref ‖ π)"
    f_dpo_valid = True
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return -torch.expm1(logr) * torch.expm1(-logr)

    def _f_prime(self, logr: Tensor) -> Tensor:
        return -torch.expm1(-2.0 * logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return torch.expm1(-logr) ** 2

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return torch.expm1(logr) - torch.expm1(-logr)

    @staticmethod
    def _w(c: VocabChunk) -> Tensor:
        """w = q²/p, capped (a fresh tensor)."""
        return torch.mul(c.logq, 2.0).sub_(c.logp).clamp_(max=c.log_cap).exp_()

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return self._w(c).add_(c.q, alpha=-2.0).add_(c.p)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return self._w(c).neg_().add_(c.p)


@register
@dataclass(**FROZEN_ENTRY)
class PearsonChi2(Divergence):
    """f(u) = (u − 1)²: D_f = χ²(π ‖ π_ref) = Σ_v (π − π_ref)²/π_ref, the usual χ² of π against π_ref.

    ``chi2`` is an alias of this entry. Not f-DPO valid: f′(0) = −2 is finite. Mode-seeking
    (f(u)/u → ∞). In ℓ: f = expm1(ℓ)², f′ = 2 expm1(ℓ), f/u = −expm1(ℓ) expm1(−ℓ),
    u f′ = 2e^ℓ expm1(ℓ). Full vocabulary with w = p²/q (capped): q f = w − 2p + q, p f′ = 2(w − p).
    """

    canonical = "pearson_chi2"
    aliases = ("chi2", "pearson", "chi_squared", "pearson_chi_squared")
    formula = "(u − 1)²"
    f_prime_formula = "2(u − 1)"
    equals = "χ²(π ‖ π_ref)"
    f_dpo_valid = False
    mass_covering = False

    def _f(self, logr: Tensor) -> Tensor:
        return torch.expm1(logr) ** 2

    def _f_prime(self, logr: Tensor) -> Tensor:
        return 2.0 * torch.expm1(logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return -torch.expm1(logr) * torch.expm1(-logr)

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return 2.0 * torch.exp(logr) * torch.expm1(logr)

    @staticmethod
    def _w(c: VocabChunk) -> Tensor:
        """w = p²/q, capped (a fresh tensor)."""
        return torch.mul(c.logp, 2.0).sub_(c.logq).clamp_(max=c.log_cap).exp_()

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return self._w(c).add_(c.p, alpha=-2.0).add_(c.q)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return self._w(c).sub_(c.p).mul_(2.0)


@register
@dataclass(**FROZEN_ENTRY)
class TotalVariation(Divergence):
    """f(u) = ½|u − 1|: D_f = TV(π, π_ref) = ½ Σ_v |π − π_ref| ∈ [0, 1].

    Not f-DPO valid (f′ = ½ sign(u − 1) is not invertible); its gradient is the subgradient with
    sign(0) = 0. In ℓ: f = ½|expm1(ℓ)|, f/u = ½|expm1(−ℓ)|, u f′ = ½ e^ℓ sign(ℓ).
    """

    canonical = "total_variation"
    aliases = ("tv", "total_variation_distance")
    formula = "½|u − 1|"
    f_prime_formula = "½ sign(u − 1)"
    equals = "TV(π, π_ref) = ½Σ|π − π_ref|"
    f_dpo_valid = False
    mass_covering = True

    def _f(self, logr: Tensor) -> Tensor:
        return 0.5 * torch.expm1(logr).abs()

    def _f_prime(self, logr: Tensor) -> Tensor:
        return 0.5 * torch.sign(logr)

    def _f_over_u(self, logr: Tensor) -> Tensor:
        return 0.5 * torch.expm1(-logr).abs()

    def _u_f_prime(self, logr: Tensor) -> Tensor:
        return 0.5 * torch.exp(logr) * torch.sign(logr)

    def vocab_value(self, c: VocabChunk) -> Tensor:
        return torch.sub(c.p, c.q).abs_().mul_(0.5)

    def vocab_dlogp(self, c: VocabChunk) -> Tensor:
        return torch.sign(c.logr).mul_(c.p).mul_(0.5)


# --------------------------------------------------------------------------------------------
# generalised JSD(β) for distillation (GKD / DistillSpec)
# --------------------------------------------------------------------------------------------


@register
@dataclass(**FROZEN_ENTRY)
class GeneralizedJSD(JSDFamily):
    """Generalised JSD(β) = β KL(π ‖ m) + (1 − β) KL(π_ref ‖ m), m = β π + (1 − β) π_ref.

    An f-divergence with f_β(u) = β u log u − (βu + 1 − β) log(βu + 1 − β); β = ½ is ``js``.
    β → 0 behaves like β·KL(π‖π_ref), β → 1 like (1 − β)·KL(π_ref‖π). Convention: β weights π
    (the policy / student, the FIRST argument). TRL's GKD ``beta`` and
    ``trl.kernels.chunked_divergence`` weight the teacher: with π = student and π_ref = teacher,
    TRL's beta equals 1 − β here (use :meth:`from_trl_beta`).
    """

    beta: float = field(  # type: ignore[misc]
        metadata={
            "range": (0.0, 1.0),
            "help": "weight of π (policy/student) in the mixture m = βπ + (1−β)π_ref; TRL's GKD beta "
            "(teacher weight) corresponds to 1 − beta.",
        }
    )

    canonical = "generalized_jsd"
    aliases = ("gjsd", "generalised_jsd", "jsd_beta")
    formula = "βu log u − (βu+1−β) log(βu+1−β)"
    f_prime_formula = "β log(u/(βu+1−β))"
    equals = "β KL(π‖m) + (1−β) KL(π_ref‖m), m = βπ + (1−β)π_ref"
    source = "GKD (Agarwal et al., 2024); DistillSpec (Zhou et al., 2024)"
    notes = "β = 0.5 is js; TRL's beta = 1 − β"

    @classmethod
    def from_trl_beta(cls, trl_beta: float) -> GeneralizedJSD:
        """The same divergence as TRL's generalised JSD with ``beta = trl_beta`` (student = π)."""
        return cls(beta=1.0 - trl_beta)
