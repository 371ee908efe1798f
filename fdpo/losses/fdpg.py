"""f-DPG: f-divergence distributional policy gradients (ICML 2023).

Source: Go, Korbak, Kruszewski, Rozen, Ryu, Dymetman, "Aligning Language Models with Preferences
through f-divergence Minimization", ICML 2023; conventions: `docs/objectives.md` §0 and §9.

Target: an unnormalised score P(x) = a(x)·b(x) (GDC: a the base model, b a binary or graded
constraint) or P(x) = a(x)·exp(r(x)/β) (RLHF's optimal policy), passed as log P; p = P/Z. The policy
π minimises D_f(π‖p) = E_p[f(π/p)], whose gradient is

    ∇_θ D_f(π‖p) = E_π[f′(π(x)/p(x)) ∇ log π(x)] = −E_q[(π/q) (R − B) ∇ log π],   R = −f′(π/p)

for any proposal q (importance sampling) and any constant baseline B (E_π[∇ log π] = 0). The loss
whose gradient is that estimate on samples x_i ∼ q is

    loss = mean_i[ (π(x_i)/q(x_i)) · (−(R(x_i) − B)) · log π(x_i) ]

with the importance weight and R detached. f′ comes from the registry, evaluated from the
log-ratio ℓ = log π − log p = log π − log P + log Z (never from π/p), so any registered f works;
reverse KL gives RL with a KL penalty (R = log p − log π − 1), forward KL gives DPG (R = p/π).

Z is a running importance-sampling estimate log Z = log mean_{all seen x} P(x)/q(x) and B a
moving average of the importance-weighted pseudo-reward mean_i[(π/q) R] (an estimate of E_π[R]):
both kept by :class:`FDPGState` (update Z with the batch before the loss, B after it, so that the
baseline never depends on the samples it multiplies). docs/objectives.md §9 fixes only "a moving-average
baseline"; what it averages is fdpo's choice (E_π[R] is the natural constant baseline), and any
constant B leaves the expected gradient unchanged (the tests check this exactly).

Numerics: everything is computed in ≥ fp32 from log-ratios; the per-sample coefficient
w·(R − B) is formed in log space as sign·exp(log w + log|R − B|) and its magnitude capped at
`coef_cap` (1e30; counted in `fdpg/coef_capped`), so extreme importance weights (|log w| = 1000)
or pseudo-rewards give a finite loss and gradient; the registry saturates f′ beyond its safe range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fdpo.divergences.base import Divergence
from fdpo.divergences.registry import resolve_divergence

DEFAULT_COEF_CAP = 1e30


def _upcast(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _weighted(log_w: Tensor, x: Tensor, log_cap: float) -> tuple[Tensor, Tensor]:
    """(sign(x)·min(e^{log w}|x|, e^log_cap), whether capped), formed in log space (0 where x = 0)."""
    log_abs = torch.where(x == 0, torch.full_like(x, -math.inf), log_w + torch.log(x.abs()))
    return torch.sign(x) * torch.exp(log_abs.clamp(max=log_cap)), log_abs > log_cap


def fdpg_loss(
    policy_logps: Tensor,
    proposal_logps: Tensor,
    target_log_scores: Tensor,
    divergence: str | Divergence,
    *,
    log_z: float | Tensor,
    baseline: float | Tensor = 0.0,
    coef_cap: float = DEFAULT_COEF_CAP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The f-DPG loss on samples x_i ∼ q (formula in the module docstring).

    Args:
        policy_logps: (N,) log π(x_i), summed over each sequence's tokens (carries the gradient).
        proposal_logps: (N,) log q(x_i) of the proposal that sampled x_i (detached).
        target_log_scores: (N,) log P(x_i) of the unnormalised target (−inf allowed where P = 0).
        divergence: registry name or object (α in the docs/objectives.md convention).
        log_z: log Z of the target (e.g. ``FDPGState.log_z``); must be finite.
        baseline: B (e.g. ``FDPGState.baseline``).
        coef_cap: cap on |(π/q)(R − B)| per sample.

    Returns:
        (loss, metrics): `loss` 0-d (≥ fp32); metrics (detached 0-d): `fdpg/pseudo_reward` (mean R),
        `fdpg/pseudo_reward_is` (mean (π/q) R, the baseline's target), `fdpg/importance_weight`
        (mean π/q), `fdpg/ess` ((Σw)²/(N Σw²), 1 when q = π), `fdpg/log_z`, `fdpg/baseline`,
        `fdpg/coef_capped` (fraction of samples whose coefficient hit the cap) and `div/<label>`:
        the importance-sampling estimate mean_i[(π/q) f(u)/u] of D_f(π‖p).
    """
    div = resolve_divergence(divergence)
    if not (
        policy_logps.dim() == 1 and policy_logps.shape == proposal_logps.shape == target_log_scores.shape
    ):
        raise ValueError(
            "policy_logps, proposal_logps and target_log_scores must all be (N,) tensors of one shape; got "
            f"{tuple(policy_logps.shape)}, {tuple(proposal_logps.shape)}, {tuple(target_log_scores.shape)}"
        )
    log_z_value = float(log_z)
    if not math.isfinite(log_z_value):
        raise ValueError(
            f"f-DPG needs a finite log Z, got {log_z_value}: no sample with P(x) > 0 has been seen yet "
            "(check the target's constraint b(x) / reward, or warm up FDPGState.update_log_z on more samples)"
        )
    if not coef_cap > 0:
        raise ValueError(f"coef_cap must be positive, got {coef_cap}")
    logp = _upcast(policy_logps)
    dtype = logp.dtype
    with torch.no_grad():
        lp = logp.detach()
        log_q = proposal_logps.detach().to(dtype)
        log_P = target_log_scores.detach().to(dtype)
        log_w = lp - log_q
        logr = lp - (log_P - log_z_value)  # ℓ = log π − log p  (+inf where P = 0; the registry caps it)
        R = -div.f_prime(logr)
        b = torch.as_tensor(baseline, dtype=dtype, device=lp.device)
        log_cap = math.log(coef_cap)
        coef, capped = _weighted(log_w, R - b, log_cap)
    loss = -(coef * logp).mean()

    with torch.no_grad():
        n = lp.numel()
        w = torch.exp(log_w.clamp(max=log_cap))
        wR, _ = _weighted(log_w, R, log_cap)
        wf, _ = _weighted(log_w, div.f_over_u(logr), log_cap)
        ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0) - math.log(n))
        metrics = {
            "fdpg/pseudo_reward": R.mean(),
            "fdpg/pseudo_reward_is": wR.mean(),
            "fdpg/importance_weight": w.mean(),
            "fdpg/ess": ess,
            "fdpg/log_z": torch.tensor(log_z_value, dtype=dtype, device=lp.device),
            "fdpg/baseline": b.clone(),
            "fdpg/coef_capped": capped.to(dtype).mean(),
            f"div/{div.label}": wf.mean(),
        }
    return loss, metrics


@dataclass
class FDPGState:
    """Running log Z (importance sampling over every sample seen) and moving-average baseline B.

    ``update_log_z(log P, log q)`` adds a batch: log Z = logsumexp_{all seen}(log P − log q) − log n.
    This is unbiased for Z under every proposal (q may change, e.g. when f-DPG's q ← π); P = 0
    samples count in n. ``update_baseline(x)``: B ← x on the first call, then
    B ← m·B + (1 − m)·x with m = `baseline_momentum`; pass ``metrics["fdpg/pseudo_reward_is"]``.
    In data-parallel training, gather the batch (or its logsumexp and count) before updating, so that
    every process holds the same state. ``state_dict``/``load_state_dict`` make it checkpointable.
    """

    baseline_momentum: float = 0.99
    log_z: float = -math.inf
    baseline: float = 0.0
    n_seen: int = 0
    _log_sum: float = field(default=-math.inf, repr=False)
    _baseline_set: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.baseline_momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {self.baseline_momentum}")

    def update_log_z(self, target_log_scores: Tensor, proposal_logps: Tensor) -> float:
        """Add samples (log P(x), log q(x)) to the estimate; return the new log Z."""
        x = (target_log_scores.detach().double() - proposal_logps.detach().double()).flatten()
        if x.numel() == 0:
            return self.log_z
        batch_lse = float(torch.logsumexp(x, 0))
        hi, lo = max(self._log_sum, batch_lse), min(self._log_sum, batch_lse)
        if hi > -math.inf:
            self._log_sum = hi + math.log1p(math.exp(lo - hi))
        self.n_seen += x.numel()
        self.log_z = self._log_sum - math.log(self.n_seen)
        return self.log_z

    def update_baseline(self, value: float | Tensor) -> float:
        """Moving average of `value` (first call sets it); return the new B."""
        v = float(value)
        if not math.isfinite(v):
            return self.baseline
        if not self._baseline_set:
            self.baseline, self._baseline_set = v, True
        else:
            m = self.baseline_momentum
            self.baseline = m * self.baseline + (1.0 - m) * v
        return self.baseline

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_momentum": self.baseline_momentum,
            "log_z": self.log_z,
            "baseline": self.baseline,
            "n_seen": self.n_seen,
            "log_sum": self._log_sum,
            "baseline_set": self._baseline_set,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline_momentum = float(state["baseline_momentum"])
        self.log_z = float(state["log_z"])
        self.baseline = float(state["baseline"])
        self.n_seen = int(state["n_seen"])
        self._log_sum = float(state["log_sum"])
        self._baseline_set = bool(state["baseline_set"])
