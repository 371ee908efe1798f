"""f-DPO: DPO with the reverse-KL regulariser replaced by any f-divergence whose f′ is invertible.

Source: Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints", ICLR 2024; conventions: `docs/objectives.md` §0 and §3.

With ℓ = log π(y|x) − log π_ref(y|x) summed over the completion tokens (no length normalisation) and
u = e^ℓ, the f-DPO implicit reward of a completion is β·f′(u). The loss of a preference pair
(y_w ≻ y_l) is a function of the **score margin**

    Δ = s(ℓ_w) − s(ℓ_l),        s(ℓ) = c_f · (f′(e^ℓ) − f′(1)),

exactly as TRL 1.16 defines its DPO losses on the "logits" βΔ (TRL only for four divergences). Every TRL 1.16
`loss_type` is here; with reverse KL (s = ℓ) each equals TRL's. Built on the score difference, so any
f-DPO-valid divergence (`SCORE_LOSS_TYPES`, TRL's `f_divergence_type` set):

    sigmoid      : −log σ(βΔ)                                     (f-DPO)
    hinge        : max(0, 1 − βΔ)                                 (SLiC)
    ipo          : (s(ℓ_w)/n_w − s(ℓ_l)/n_l − 1/(2β))²             (IPO eq. 17; n = completion length,
                   the per-token normalisation TRL 1.16 applies; pass no lengths for the paper's n = 1)
    sigmoid_norm : −log σ(β(s(ℓ_w)/n_w − s(ℓ_l)/n_l))
    robust       : [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)   (rDPO, ε = label_smoothing)
    exo_pair     : σ(βΔ)(log σ(βΔ) − log(1−ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)   (EXO eq. 16)
    discopop     : −log σ(βΔ)·(1 − m) + e^{−βΔ}·m,  m = σ(βΔ/τ)   (DiscoPOP eq. 5, τ = discopop_tau)
    sft          : token mean of −log π over the chosen completions (no reference term)

Built on ℓ_w, ℓ_l themselves, reverse KL only (`LOG_RATIO_LOSS_TYPES`; the partition term β·log Z(x) of the
f-divergence reparameterisation only cancels in a difference, which is why TRL rejects these too):

    nca_pair     : −log σ(βℓ_w) − ½ log σ(−βℓ_w) − ½ log σ(−βℓ_l)
    bco_pair     : −log σ(βℓ_w) − log σ(−βℓ_l)
    sppo_hard    : (ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))²
    aot          : −(1−ε) log σ(βδ) − ε log σ(−βδ),  δ = sort(log π_w − log π_l) − sort(log π_ref,w − log π_ref,l)
    aot_unpaired : the same with δ = sort(ℓ_w) − sort(ℓ_l)      (sorts over the batch)
    apo_zero     : 1 − σ(βℓ_w) + σ(βℓ_l);   apo_down : σ(βℓ_w) + 1 − σ(β(ℓ_w − ℓ_l))

As in TRL 1.16, `label_smoothing` only enters robust, exo_pair and the aot losses.

Why `f′(e^ℓ) − f′(1)`: D_f is unchanged by f → f + k(u − 1), which shifts f′ by k; subtracting f′(1)
makes every score independent of that choice (s(0) = 0). The constant cancels in Δ for sigmoid, hinge
and robust; for TRL's length-normalised IPO it does not, and this choice is TRL's (forward KL:
1 − e^{−ℓ}; α: (1 − e^{−αℓ})/α).

Why `c_f`: the f-DPO paper and TRL write Jensen–Shannon with the generator u log u − (1+u) log((1+u)/2),
twice the registry's ½[…] (docs/objectives.md §0 note). §3 fixes the f-DPO JS score as log σ(ℓ_w) − log σ(ℓ_l),
so c_js = 2. c_f is the registry entry's `fdpo_score_scale` field: 2.0 for `js`, 1.0 for every other
entry, i.e. the registry's f′ (so `generalized_jsd(0.5)`, the registry's ½-JS, gives half the `js` score:
the same loss with β halved).

In terms of ℓ (c_f and f′(1) applied):
    reverse_kl  s = ℓ                        (standard DPO)
    forward_kl  s = 1 − e^{−ℓ}
    js          s = log 2 + log σ(ℓ)
    alpha       s = (1 − e^{−αℓ})/α          (α here = 1 − TRL's `f_alpha_divergence_coef`)
    jeffreys    s = ℓ + 1 − e^{−ℓ};   squared_hellinger  s = 1 − e^{−ℓ/2};   neyman_chi2  s = 1 − e^{−2ℓ}

Numerics. Scores are computed in at least fp32 (bf16/fp16 inputs are upcast). Several scores grow like
e^{k|ℓ|} for ℓ → −∞ (forward KL, α, Jeffreys, Hellinger, Neyman); sequence log-ratios reach −1000, where
e^{1000} is not representable even in fp64. TRL 1.16's forward KL gives an infinite loss and non-finite
gradients once ℓ < −88 (fp32; checked: ℓ_w = −100), and its α clamp makes the gradient w.r.t. such an ℓ
exactly zero. fdpo instead uses the exact score while |s| ≤ `score_cap` (default 1e10) and continues it
linearly, with the slope it has at the cap (a C¹ continuation), beyond:

    s̃(ℓ) = s(ℓ_lo) + s′(ℓ_lo)·(ℓ − ℓ_lo)   for ℓ < ℓ_lo,  where |s(ℓ_lo)| = score_cap   (same above ℓ_hi).

So loss and gradient are finite for any finite ℓ, no clamp cuts the gradient to zero (on the linear
part |∂s/∂ℓ| = s′(ℓ_lo) > 0; a gradient is 0 only where the exact one underflows, e.g. a pair already won
by a margin βΔ ≫ 100), and the loss is exact wherever the exact score is ≤ score_cap in magnitude
(forward KL: ℓ ≥ −23; α = ½: ℓ ≥ −46 at the default cap). The thresholds are found once per divergence
by bisection on the monotone f′ (f-DPO validity means f′ strictly increases).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fdpo.divergences import Divergence, f_dpo_valid_divergences, resolve_divergence

SCORE_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"
)  # TRL 1.16's `f_divergence_type`-capable set
LOG_RATIO_LOSS_TYPES: tuple[str, ...] = (
    "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"
)
LOSS_TYPES: tuple[str, ...] = SCORE_LOSS_TYPES + LOG_RATIO_LOSS_TYPES
DEFAULT_SCORE_CAP = 1e10

_SEARCH_BOUND = 1e6  # |ℓ| beyond which no threshold is searched (the registry caps |ℓ| there too)


def _f_prime64(d: Divergence, logr: float) -> float:
    with torch.no_grad():
        return float(d.f_prime(torch.tensor(logr, dtype=torch.float64)))


def f_dpo_invalid_reason(d: Divergence) -> str | None:
    """None when `d` can serve f-DPO, else why not (f′ must be invertible with 0 ∉ dom f′, §3)."""
    if d.f_dpo_valid:
        return None
    grid = [x / 2 for x in range(-10, 11)]
    values = [_f_prime64(d, x) for x in grid]
    for (a, va), (b, vb) in zip(zip(grid, values), zip(grid[1:], values[1:])):
        if not vb > va:
            return (
                f"f′ is not invertible (f′(e^{a:g}) = {va:g} and f′(e^{b:g}) = {vb:g}), so the policy cannot be "
                "written in closed form from the implicit reward"
            )
    low = _f_prime64(d, -700.0)
    if math.isfinite(low) and low > -100.0:
        return (
            f"0 is in the domain of f′ (f′(u) → {low:g} as u → 0 is finite), so the normaliser of the optimal "
            "policy does not cancel in the preference model"
        )
    return "the registry marks it as not f-DPO-valid (f′ must be invertible with 0 ∉ dom f′)"


def f_dpo_valid_names() -> list[str]:
    """Canonical names of the registry's f-DPO-valid divergences."""
    return f_dpo_valid_divergences()


def check_f_dpo_valid(d: Divergence) -> None:
    """Raise ValueError naming the divergence and the reason when it cannot serve f-DPO."""
    reason = f_dpo_invalid_reason(d)
    if reason is not None:
        raise ValueError(
            f"divergence '{d.label}' cannot be used with f-DPO: {reason} (Beyond Reverse KL, ICLR 2024; "
            f"docs/objectives.md §3). f-DPO-valid: {', '.join(f_dpo_valid_names())}."
        )


class FDPOScore:
    """ℓ ↦ s(ℓ) = c_f·(f′(e^ℓ) − f′(1)), exact for |s| ≤ `score_cap`, linearly continued beyond.

    Built once per divergence (the thresholds come from a bisection in float64); calling it is a few
    elementwise ops. See the module docstring for the formula and its source.
    """

    def __init__(self, divergence: str | Divergence, *, score_cap: float = DEFAULT_SCORE_CAP, **params: Any):
        d = resolve_divergence(divergence, params)
        check_f_dpo_valid(d)
        if not (score_cap > 0 and math.isfinite(score_cap)):
            raise ValueError(f"score_cap must be a positive finite number, got {score_cap!r}")
        self.divergence = d
        self.score_cap = float(score_cap)
        self.scale = float(d.fdpo_score_scale)
        self.offset = _f_prime64(d, 0.0)  # f′(1)
        # reverse KL: s(ℓ) = ℓ exactly (standard DPO), not ℓ + 1 − 1 rounded
        self.identity = d.canonical == "reverse_kl" and self.scale == 1.0
        self.lo, self.s_lo, self.slope_lo = self._threshold(-1.0)
        self.hi, self.s_hi, self.slope_hi = self._threshold(+1.0)

    @property
    def label(self) -> str:
        return self.divergence.label

    def _exact(self, logr: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.divergence.f_prime(logr) - self.offset)

    def _within_cap(self, logr: float) -> bool:
        value = float(self._exact(torch.tensor(logr, dtype=torch.float64)).detach())
        return math.isfinite(value) and abs(value) <= self.score_cap

    def _search_bound(self, side: float) -> float:
        """How far to search on `side`: ±1e6, or the end of the registry's exact float64 range if nearer
        (so the search never triggers the registry's clamp and its saturation counter)."""
        safe_range = getattr(self.divergence, "safe_logr_range", None)
        if safe_range is None:
            return side * _SEARCH_BOUND
        lo, hi = safe_range("f_prime", torch.float64)
        return max(lo, -_SEARCH_BOUND) if side < 0 else min(hi, _SEARCH_BOUND)

    def _threshold(self, side: float) -> tuple[float, float, float]:
        """(ℓ*, s(ℓ*), s′(ℓ*)) where |s| reaches the cap on `side` (−1 below, +1 above); ±inf if never."""
        bound = self._search_bound(side)
        if self._within_cap(bound):
            return side * math.inf, 0.0, 0.0
        inside, outside = 0.0, bound
        for _ in range(200):  # |s| is monotone in |ℓ| on each side of 0
            mid = 0.5 * (inside + outside)
            if mid in (inside, outside):
                break
            if self._within_cap(mid):
                inside = mid
            else:
                outside = mid
        x = torch.tensor(inside, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            value = self._exact(x)
            (slope,) = torch.autograd.grad(value, x)
        return inside, float(value.detach()), float(slope)

    def __call__(self, logr: torch.Tensor) -> torch.Tensor:
        """Scores of sequence log-ratios `logr` (any shape), in `logr`'s dtype promoted to ≥ fp32."""
        x = logr.to(torch.promote_types(logr.dtype, torch.float32))
        if self.identity:
            return x
        out = self._exact(x.clamp(min=self.lo, max=self.hi))
        if math.isfinite(self.lo):
            out = torch.where(x < self.lo, self.s_lo + self.slope_lo * (x - self.lo), out)
        if math.isfinite(self.hi):
            out = torch.where(x > self.hi, self.s_hi + self.slope_hi * (x - self.hi), out)
        return out


def _standardised_f(d: Divergence, logr: torch.Tensor) -> torch.Tensor:
    """f̃(u) = f(u) − f′(1)(u − 1) ≥ 0 in float64, ℓ clipped to ±600: a drift monitor, zero at u = 1."""
    x = logr.detach().to(torch.float64).clamp(-600.0, 600.0)
    with torch.no_grad():
        return d.f_normalized(x)


def _per_token_mean(score: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """s/n with n the completion length clamped to ≥ 1 (TRL's per-token normalisation); s when no lengths."""
    return score if lengths is None else score / lengths.to(score.dtype).clamp(min=1.0)


def _score_loss(
    loss_type: str,
    s_w: torch.Tensor,
    s_l: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    discopop_tau: float,
) -> torch.Tensor:
    """The losses of `SCORE_LOSS_TYPES` (except `sft`) on the scores s_w = s(ℓ_w), s_l = s(ℓ_l)."""
    logits = beta * (s_w - s_l)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(logits)
    if loss_type == "hinge":
        return torch.relu(1.0 - logits)
    if loss_type == "ipo":
        margin = _per_token_mean(s_w, chosen_lengths) - _per_token_mean(s_l, rejected_lengths)
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        margin = _per_token_mean(s_w, chosen_lengths) - _per_token_mean(s_l, rejected_lengths)
        return -F.logsigmoid(beta * margin)
    if loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":  # KL(q‖p) over {w, l}: q = σ(±βΔ), p = (1 − ε, ε)
        return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
            F.logsigmoid(-logits) - math.log(eps)
        )
    if loss_type == "discopop":  # e^{−x}·σ(x/τ) as exp(log σ(x/τ) − x): TRL's e^{−x}·m is inf·0 = NaN for x ≪ 0
        return -F.logsigmoid(logits) * torch.sigmoid(-logits / discopop_tau) + torch.exp(
            F.logsigmoid(logits / discopop_tau) - logits
        )
    raise AssertionError(loss_type)


def _log_ratio_loss(
    loss_type: str,
    logr_w: torch.Tensor,
    logr_l: torch.Tensor,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """The losses of `LOG_RATIO_LOSS_TYPES` (reverse KL only) on ℓ_w, ℓ_l (and, for `aot`, the log-probs)."""
    r_w, r_l = beta * logr_w, beta * logr_l
    eps = label_smoothing
    if loss_type == "nca_pair":
        return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    if loss_type == "bco_pair":
        return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)
    if loss_type == "sppo_hard":
        return (logr_w - 0.5 / beta) ** 2 + (logr_l + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            pol_w, pol_l, ref_w, ref_l = logps
            delta = torch.sort(pol_w - pol_l, dim=0)[0] - torch.sort(ref_w - ref_l, dim=0)[0]
        else:
            delta = torch.sort(logr_w, dim=0)[0] - torch.sort(logr_l, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1.0 - eps) - F.logsigmoid(-beta * delta) * eps
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(r_w) + torch.sigmoid(r_l)
    if loss_type == "apo_down":
        return torch.sigmoid(r_w) + 1.0 - torch.sigmoid(r_w - r_l)
    raise AssertionError(loss_type)


def check_loss_type(loss_type: str, divergence: Divergence, *, label_smoothing: float = 0.0) -> None:
    """ValueError naming `loss_type` (and `divergence`) when f-DPO cannot train this combination."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown f-DPO loss_type {loss_type!r}; valid: {list(LOSS_TYPES)}")
    if loss_type in LOG_RATIO_LOSS_TYPES and divergence.canonical != "reverse_kl":
        raise ValueError(
            f"loss_type {loss_type!r} cannot be used with divergence {divergence.label!r}: it is built on the "
            "log-ratios ℓ_w, ℓ_l themselves, not on their difference, so the partition term β·log Z(x) of the "
            "f-divergence reparameterisation does not cancel (as TRL's `f_divergence_type`, only reverse KL). "
            f"With another divergence use one of {list(SCORE_LOSS_TYPES)}."
        )
    if loss_type == "robust" and not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"the robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    if loss_type == "exo_pair" and not (0.0 < label_smoothing < 1.0):
        raise ValueError(
            f"the exo_pair loss needs label_smoothing in (0, 1) (the EXO paper recommends 1e-3), got {label_smoothing}"
        )


def fdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    divergence: str | Divergence | FDPOScore,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    chosen_token_logps: torch.Tensor | None = None,
    chosen_token_mask: torch.Tensor | None = None,
    score_cap: float = DEFAULT_SCORE_CAP,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair f-DPO loss and per-pair metrics (see the module docstring for every formula).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: shape (B,),
            log-probabilities of the completions summed over their tokens.
        divergence: a registry name, a registry object, or a prebuilt `FDPOScore` (cheapest in a loop).
            Alpha's α follows docs/objectives.md §0: α = 1 − TRL's `f_alpha_divergence_coef`.
        beta: β of the implicit reward β·f′(u) (τ of IPO).
        loss_type: one of `LOSS_TYPES`; those of `LOG_RATIO_LOSS_TYPES` need reverse KL.
        label_smoothing: ε of `robust` (in [0, 0.5)), `exo_pair` (in (0, 1)) and `aot`/`aot_unpaired`;
            ignored by the other loss types (as in TRL).
        chosen_lengths, rejected_lengths: completion token counts, used by `ipo` and `sigmoid_norm` (TRL's
            per-token normalisation; clamped to ≥ 1). Omit both for the unnormalised IPO of the paper.
        discopop_tau: τ of `discopop`.
        chosen_token_logps, chosen_token_mask: (B, T) per-token log π of the chosen completions and their
            completion mask; `sft` only (its loss is the token mean of −log π over the batch, per pair).
        score_cap: where the exact score is continued linearly (ignored when `divergence` is an FDPOScore).

    Returns:
        (loss, metrics): `loss` of shape (B,) in ≥ fp32 (for `aot`/`aot_unpaired` indexed by sorted rank,
        for `sft` the batch value repeated: only its mean has a meaning); `metrics` maps names to detached
        (B,) tensors: `scores/chosen`, `scores/rejected`, `scores/margins` (s(ℓ) and Δ), `rewards/chosen`,
        `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (β·ℓ, as TRL logs them) and
        `div/<label>`: ½[f̃(u_w) + f̃(u_l)] with f̃(u) = f(u) − f′(1)(u − 1) ≥ 0, the registry's f on the
        batch's sequences (a drift monitor on the preference data, not an unbiased estimate of
        D_f(π‖π_ref), which needs samples of π_ref).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    score = divergence if isinstance(divergence, FDPOScore) else FDPOScore(divergence, score_cap=score_cap)
    check_loss_type(loss_type, score.divergence, label_smoothing=label_smoothing)

    def upcast(t: torch.Tensor) -> torch.Tensor:  # before subtracting: bf16 log-probs near −500 have ulp 2
        return t.to(torch.promote_types(t.dtype, torch.float32))

    logps = tuple(upcast(t) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_logr = logps[0] - logps[2]
    rejected_logr = logps[1] - logps[3]
    s_w = score(chosen_logr)
    s_l = score(rejected_logr)
    margin = s_w - s_l

    if loss_type == "sft":
        if chosen_token_logps is None or chosen_token_mask is None:
            raise ValueError("loss_type 'sft' needs chosen_token_logps and chosen_token_mask")
        nll = -upcast(chosen_token_logps)[chosen_token_mask.bool()].mean()
        loss = nll.expand(s_w.shape[0])
    elif loss_type in LOG_RATIO_LOSS_TYPES:
        loss = _log_ratio_loss(
            loss_type, chosen_logr, rejected_logr, logps, beta=beta, label_smoothing=label_smoothing
        )
    else:
        loss = _score_loss(
            loss_type,
            s_w,
            s_l,
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            discopop_tau=discopop_tau,
        )

    with torch.no_grad():
        rewards_w = beta * chosen_logr.detach()
        rewards_l = beta * rejected_logr.detach()
        div = 0.5 * (
            _standardised_f(score.divergence, chosen_logr) + _standardised_f(score.divergence, rejected_logr)
        )
        metrics = {
            "scores/chosen": s_w.detach(),
            "scores/rejected": s_l.detach(),
            "scores/margins": margin.detach(),
            "rewards/chosen": rewards_w,
            "rewards/rejected": rewards_l,
            "rewards/margins": rewards_w - rewards_l,
            "rewards/accuracies": (rewards_w > rewards_l).to(s_w.dtype),
            f"div/{score.label}": div.to(s_w.dtype),
        }
    return loss, metrics
