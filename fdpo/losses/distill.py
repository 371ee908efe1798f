"""Knowledge distillation with a selectable divergence between student and teacher (docs/objectives.md §9).

Per completion position t, with the student π_θ in the π slot and the teacher p in the π_ref slot of the
fdpo convention (docs/objectives.md §0), over the full vocabulary (in chunks, `full_vocab_divergence`):

    D_t = D_f(π_θ(·|ctx_t) ‖ p(·|ctx_t)) = Σ_v p(v) f(π_θ(v)/p(v)),      L = (1/N) Σ_t D_t

over the N completion tokens of the micro-batch. With the registry's names this gives:

    forward_kl        KL(p ‖ π_θ)    the usual KD (mass covering; Hinton et al. 2015; GKD β = 0)
    reverse_kl        KL(π_θ ‖ p)    mode seeking (MiniLLM; GKD β = 1)
    generalized_jsd   β KL(π_θ‖m) + (1−β) KL(p‖m), m = βπ_θ + (1−β)p  (GKD / DistillSpec; TRL's GKD `beta`
                      weights the teacher: TRL beta = 1 − β here)
    total_variation   ½ Σ_v |π_θ(v) − p(v)|  (DistillSpec's TVD)
    … and every other registered f (js, alpha, jeffreys, squared_hellinger, chi²).

Distributions are softmax(logits / T) with `temperature` T for both models (no T² factor). The teacher is
frozen: its logits are detached. The data is the fixed demonstrations or, with probability λ per batch,
completions sampled from the student (GKD's on-policy mixture, handled by the trainer).

BD-KD ("Balancing the Divergences for Online Knowledge Distillation", Amara et al. 2022; seed 000): the
student loss combines forward and reverse KL with sample-wise weights set by the entropy gap between
student and teacher. The paper's exact weighting equation could not be retrieved here (the seed holds
only the abstract); fdpo implements this continuous form of the entropy-gap rule, per position t, with
entropies H computed without gradient:

    w_t = H(π_θ,t) / (H(π_θ,t) + H(p_t))        (½ when both are 0)
    D_t = (1 − w_t) · KL(p_t ‖ π_θ,t) + w_t · KL(π_θ,t ‖ p_t)

so a student less confident than its teacher (H(π_θ) > H(p)) is pushed mostly by the mode-seeking
reverse KL, and an over-confident one mostly by the mass-covering forward KL; equal entropies give the
plain average. Treat it as BD-KD-style, not a reproduction of the paper's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fdpo.divergences import Divergence, extra_objective, full_vocab_divergence, resolve_divergence
from fdpo.divergences.extras import BDKD as _BDKD_ENTRY
from fdpo.divergences.full_vocab import default_chunk_size

BDKD = _BDKD_ENTRY.canonical  # name and aliases are the registry's (fdpo/divergences/extras.py)


@dataclass(frozen=True)
class DistillObjective:
    """A registry divergence, or BD-KD's entropy-balanced forward/reverse KL (`divergence` is None)."""

    divergence: Divergence | None

    @property
    def label(self) -> str:
        return BDKD if self.divergence is None else self.divergence.label

    @property
    def canonical(self) -> str:
        return BDKD if self.divergence is None else self.divergence.canonical

    @property
    def params(self) -> dict[str, float]:
        return {} if self.divergence is None else dict(self.divergence.params)


def resolve_distill_objective(name: str | Divergence | DistillObjective, params: dict[str, Any] | None = None):
    """`bdkd` (the registry's extra objective, with its aliases) or any registry divergence, with its parameters."""
    if isinstance(name, DistillObjective):
        return name
    if isinstance(name, Divergence):
        return DistillObjective(name)
    if extra_objective(name) is _BDKD_ENTRY:
        if params:
            raise ValueError(f"the BD-KD objective takes no divergence parameters, got {params}")
        return DistillObjective(None)
    return DistillObjective(resolve_divergence(name, params))


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0,
                  chunk_size: int | None = None) -> Tensor:
    """Per-position entropy −Σ_v p_v log p_v of softmax(logits/T), float32 (float64 in), in chunks, no grad."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.zeros(flat.shape[0], dtype=dtype, device=logits.device)
    rows = (mask.reshape(-1).bool().nonzero().squeeze(1) if mask is not None
            else torch.arange(flat.shape[0], device=logits.device))
    step = chunk_size or default_chunk_size(vocab, logits.device)
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        logp = torch.log_softmax(flat.index_select(0, idx).to(dtype) / temperature, dim=-1)
        out[idx] = -(logp.exp() * logp).sum(-1)
    return out.reshape(lead)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    objective: str | Divergence | DistillObjective,
    *,
    temperature: float = 1.0,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean distillation loss and its metrics.

    Args:
        student_logits: (..., V) logits of the student (π slot; gradients flow to it).
        teacher_logits: (..., V) logits of the teacher (π_ref slot; detached).
        mask: (...) 1 at the completion positions that count.
        objective: a registry divergence name/label/object, `"bdkd"`, or a `DistillObjective`.
        temperature: both distributions are softmax(logits / T).
        num_items_in_batch: normaliser N; None: the number of positions in `mask` (≥ 1).

    Returns:
        (loss, metrics): `div/<label>` (token mean over this micro-batch); for BD-KD also `div/forward_kl`,
        `div/reverse_kl`, `bdkd/w_reverse`, `entropy/student`, `entropy/teacher`. Metrics are detached.
    """
    obj = resolve_distill_objective(objective)
    mask = mask.bool()
    teacher_logits = teacher_logits.detach()
    n_local = mask.sum().clamp(min=1).to(torch.float32)
    norm = n_local if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=mask.device).float()
    kw = {"mask": mask, "temperature": temperature, "chunk_size": chunk_size}
    metrics: dict[str, Tensor] = {}
    if obj.divergence is not None:
        per_token = full_vocab_divergence(student_logits, teacher_logits, obj.divergence, **kw)
    else:
        fkl = full_vocab_divergence(student_logits, teacher_logits, "forward_kl", **kw)
        rkl = full_vocab_divergence(student_logits, teacher_logits, "reverse_kl", **kw)
        h_s = token_entropy(student_logits.detach(), mask, temperature=temperature, chunk_size=chunk_size)
        h_t = token_entropy(teacher_logits, mask, temperature=temperature, chunk_size=chunk_size)
        total = h_s + h_t
        w_rev = torch.where(total > 0, h_s / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5).to(fkl.dtype)
        per_token = (1 - w_rev) * fkl + w_rev * rkl
        metrics.update({
            "div/forward_kl": (fkl.detach() * mask).sum() / n_local,
            "div/reverse_kl": (rkl.detach() * mask).sum() / n_local,
            "bdkd/w_reverse": (w_rev * mask).sum() / n_local,
            "entropy/student": (h_s * mask).sum() / n_local,
            "entropy/teacher": (h_t * mask).sum() / n_local,
        })
    total_div = (per_token * mask).sum()
    metrics[f"div/{obj.label}"] = total_div.detach() / n_local
    return total_div / norm, metrics
