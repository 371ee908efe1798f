"""Exact full-vocabulary divergence per position, in chunks of positions (objectives.md §1.1).

    D_f(p ‖ q)[b, t] = Σ_v q_v f(p_v / q_v),   p = softmax(z/T), q = softmax(z_ref/T)

The FIRST distribution is the π slot of the fdpo convention (the policy, or the student in
distillation), the second the π_ref slot (reference or teacher). Gradients flow to whichever
argument requires them (both may: on-policy distillation with a trainable teacher, or a learned
reference).

Memory. Both functions are custom ``torch.autograd.Function`` s. The forward pass runs over
chunks of positions and keeps no autograd graph: only the per-position log-normalisers (N floats
per side) are saved. The backward pass recomputes each chunk and writes its gradient straight into
one preallocated gradient buffer, so peak extra memory is about one chunk's working set
(≈ 6 × chunk × vocab floats) instead of several full (batch, seq, vocab) tensors. Masked positions
are skipped (value 0, gradient 0). The gradient uses closed forms, not autograd:

    ∂D/∂log p_v = p_v f′(u_v) =: B_v                     (Divergence.vocab_dlogp)
    ∂D/∂log q_v = q_v f(u_v) − p_v f′(u_v) = A_v − B_v     (A = Divergence.vocab_value)
    ∂D/∂z_v     = (B_v − p_v Σ_w B_w) / T,   ∂D/∂z_ref,v = (C_v − q_v Σ_w C_w) / T,  C = A − B.

Numerics: the math runs in float32 (float64 if an input is float64) whatever the logits' dtype;
log-probabilities are floored at ``LOG_ZERO`` = −1e4 so that −inf logits give 0 contributions
(a token with p = 0 < q under forward KL then costs ≈ q·1e4 instead of +∞); each per-token term
is capped at finfo.max/16/vocab so a row sum never overflows. The result is float32 (float64).

``full_vocab_divergence_from_hidden`` fuses the LM-head projection: it never materialises the
(batch, seq, vocab) logits of either model, projects chunk by chunk, and returns gradients for the
hidden states, the LM-head weights and biases of whichever side requires them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fdpo.divergences.base import LOG_ZERO, Divergence, VocabChunk
from fdpo.divergences.numerics import SAFE_FRACTION
from fdpo.divergences.registry import resolve_divergence

#: default chunk, in (position × vocab) elements: on CPU small enough that a chunk's working set
#: (≈ 6 such tensors, 2 MiB each in float32) stays in a last-level cache; on accelerators large
#: enough to amortise kernel launches (32 MiB per tensor in float32).
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**19, "accelerator": 2**23}


def default_chunk_size(vocab: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk so that a chunk holds about ``DEFAULT_CHUNK_ELEMENTS`` logits."""
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    return max(1, DEFAULT_CHUNK_ELEMENTS[kind] // max(vocab, 1))


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _log_cap(dtype: torch.dtype, vocab: int) -> float:
    return math.log(torch.finfo(dtype).max * SAFE_FRACTION / max(vocab, 1))


class _Plan:
    """Which rows (flattened positions) are computed, in chunks: contiguous slices when nothing is
    masked, index tensors of the unmasked rows otherwise."""

    def __init__(self, n_rows: int, mask: Tensor | None, chunk_rows: int, device: torch.device) -> None:
        self.n_rows = n_rows
        self.chunk_rows = chunk_rows
        if mask is None:
            self.index: Tensor | None = None
            self.n_valid = n_rows
        else:
            self.index = mask.reshape(-1).to(device=device).nonzero().squeeze(1)
            self.n_valid = int(self.index.numel())
            if self.n_valid == n_rows:
                self.index = None

    @property
    def dense(self) -> bool:
        return self.index is None

    def chunks(self) -> Iterator[slice | Tensor]:
        for start in range(0, self.n_valid, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.n_valid)
            yield slice(start, stop) if self.index is None else self.index[start:stop]


def _rows(x: Tensor, sel: slice | Tensor) -> Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _log_softmax_rows(z: Tensor, lse: Tensor | None, owned: bool) -> tuple[Tensor, Tensor]:
    """log-softmax of a chunk (rows, vocab) floored at LOG_ZERO, and the per-row log-normaliser.

    Without ``lse`` (forward pass): the fused ``log_softmax`` kernel, and lse = z_max − log p_max
    read off at the arg-max (exact to an ulp of z_max). With ``lse`` (backward pass): z − lse,
    in place when the chunk is a fresh tensor (``owned``).
    """
    if lse is None:
        out = torch.log_softmax(z, dim=-1)
        z_max, arg = z.max(dim=-1, keepdim=True)
        lse = (z_max - out.gather(-1, arg)).squeeze(-1)
    else:
        out = z.sub_(lse.unsqueeze(-1)) if owned else z - lse.unsqueeze(-1)
    return out.clamp_(min=LOG_ZERO), lse


def _chunk_value(div: Divergence, c: VocabChunk) -> Tensor:
    return div.vocab_value(c).sum(dim=-1)


def _chunk_grads(
    div: Divergence, c: VocabChunk, scale: Tensor, need_p: bool, need_q: bool
) -> tuple[Tensor | None, Tensor | None]:
    """d(Σ_rows scale·D)/dz for both sides of one chunk (rows, vocab), in the compute dtype."""
    b = div.vocab_dlogp(c)
    if any(b is t for t in c.__dict__.values()) or b._base is not None:
        b = b.clone()
    gq = None
    if need_q:
        gq = div.vocab_value(c) - b
        gq.addcmul_(c.q, gq.sum(dim=-1, keepdim=True), value=-1.0).mul_(scale)
    gp = None
    if need_p:
        gp = b.addcmul_(c.p, b.sum(dim=-1, keepdim=True), value=-1.0).mul_(scale)
    return gp, gq


def _store(buf: Tensor, sel: slice | Tensor, value: Tensor) -> None:
    if isinstance(sel, slice):
        buf[sel].copy_(value)
    else:
        buf.index_copy_(0, sel, value.to(buf.dtype))


# ---------------------------------------------------------------------------------------------
# from logits
# ---------------------------------------------------------------------------------------------


class _FullVocabFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        zr: Tensor,
        mask: Tensor | None,
        div: Divergence,
        chunk_rows: int,
        temperature: float,
    ) -> Tensor:
        n, vocab = z.shape
        cdtype = _compute_dtype(z, zr)
        plan = _Plan(n, mask, chunk_rows, z.device)
        log_cap = _log_cap(cdtype, vocab)
        out = torch.zeros(n, dtype=cdtype, device=z.device)
        lse = torch.zeros(2, n, dtype=cdtype, device=z.device)
        with torch.no_grad():
            for sel in plan.chunks():
                zp, zq = (_scaled_rows(t, sel, cdtype, temperature) for t in (z, zr))
                logp, lse_p = _log_softmax_rows(zp[0], None, zp[1])
                logq, lse_q = _log_softmax_rows(zq[0], None, zq[1])
                d = _chunk_value(div, VocabChunk(logp, logq, log_cap))
                if plan.dense:
                    out[sel], lse[0, sel], lse[1, sel] = d, lse_p, lse_q
                else:
                    out.index_copy_(0, sel, d)
                    lse[0].index_copy_(0, sel, lse_p)
                    lse[1].index_copy_(0, sel, lse_q)
        ctx.save_for_backward(z, zr, lse)
        ctx.plan, ctx.div, ctx.temperature, ctx.log_cap = plan, div, temperature, log_cap
        ctx.mark_non_differentiable(lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        z, zr, lse = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        plan: _Plan = ctx.plan
        cdtype = lse.dtype
        gz = gzr = None
        if need_p:
            gz = torch.empty_like(z) if plan.dense else torch.zeros_like(z)
        if need_q:
            gzr = torch.empty_like(zr) if plan.dense else torch.zeros_like(zr)
        scale_all = grad_out.to(cdtype) / ctx.temperature
        with torch.no_grad():
            for sel in plan.chunks():
                zp, zq = (_scaled_rows(t, sel, cdtype, ctx.temperature) for t in (z, zr))
                logp, _ = _log_softmax_rows(zp[0], _rows(lse[0], sel), zp[1])
                logq, _ = _log_softmax_rows(zq[0], _rows(lse[1], sel), zq[1])
                c = VocabChunk(logp, logq, ctx.log_cap)
                gp, gq = _chunk_grads(ctx.div, c, _rows(scale_all, sel).unsqueeze(-1), need_p, need_q)
                if gp is not None:
                    _store(gz, sel, gp)
                if gq is not None:
                    _store(gzr, sel, gq)
        return gz, gzr, None, None, None, None


def _scaled_rows(
    x: Tensor, sel: slice | Tensor, dtype: torch.dtype, temperature: float
) -> tuple[Tensor, bool]:
    """Rows of ``x`` in ``dtype`` divided by T; also whether the result is a fresh tensor we own."""
    rows = _rows(x, sel)
    owned = not isinstance(sel, slice)
    if rows.dtype != dtype:
        rows, owned = rows.to(dtype), True
    if temperature != 1.0:
        rows = rows.div_(temperature) if owned else rows / temperature
        owned = True
    return rows, owned


def full_vocab_divergence(
    policy_logits: Tensor,
    ref_logits: Tensor,
    divergence: str | Divergence,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position D_f(π ‖ π_ref) = Σ_v π_ref(v) f(π(v)/π_ref(v)) over the full vocabulary.

    Args:
        policy_logits: (..., vocab) logits (or log-probabilities) of π, the policy / student.
        ref_logits: (..., vocab) logits (or log-probabilities) of π_ref, the reference / teacher.
            Either or both may require grad.
        divergence: a registered name/label (``"js"``, ``"alpha(0.5)"``) or a :class:`Divergence`.
        mask: optional (...) bool/0-1 tensor; positions where it is 0 give 0 and no gradient.
        chunk_size: positions per chunk (default: :func:`default_chunk_size`).
        temperature: both distributions are softmax(logits / temperature).

    Returns:
        (...) tensor of per-position divergences, float32 (float64 for float64 inputs).

    Distillation: ``full_vocab_divergence(student_logits, teacher_logits, "forward_kl")`` is
    KL(teacher ‖ student), ``"reverse_kl"`` is KL(student ‖ teacher), ``generalized_jsd(β)``
    the GKD JSD with student weight β (TRL's beta = 1 − β).
    """
    div = resolve_divergence(divergence)
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy and reference logits differ in shape: {policy_logits.shape} vs {ref_logits.shape}"
        )
    if policy_logits.dim() < 1:
        raise ValueError("logits need a vocabulary dimension")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = policy_logits.shape[:-1], policy_logits.shape[-1]
    flat_mask = _flat_mask(mask, lead)
    rows = chunk_size or default_chunk_size(vocab, policy_logits.device)
    out = _FullVocabFromLogits.apply(
        policy_logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        flat_mask,
        div,
        int(rows),
        float(temperature),
    )
    return out.reshape(lead)


def _flat_mask(mask: Tensor | None, lead: torch.Size) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)}")
    return mask.reshape(-1).bool()


# ---------------------------------------------------------------------------------------------
# from hidden states (fused LM-head projection)
# ---------------------------------------------------------------------------------------------


def _project(
    h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, temperature: float
) -> Tensor:
    """(rows, H) @ (V, H)ᵀ (+ b), in the weights' dtype like the model's own LM head, then the
    compute dtype, divided by T. Returns a fresh tensor."""
    h = h.to(weight.dtype)
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    z = z.to(dtype)
    if temperature != 1.0:
        z = z.div_(temperature)
    return z


class _FullVocabFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        hr: Tensor,
        wr: Tensor,
        br: Tensor | None,
        mask: Tensor | None,
        div: Divergence,
        chunk_rows: int,
        temperature: float,
    ) -> Tensor:
        n, vocab = h.shape[0], w.shape[0]
        cdtype = _compute_dtype(h, w, hr, wr)
        plan = _Plan(n, mask, chunk_rows, h.device)
        log_cap = _log_cap(cdtype, vocab)
        out = torch.zeros(n, dtype=cdtype, device=h.device)
        lse = torch.zeros(2, n, dtype=cdtype, device=h.device)
        with torch.no_grad():
            for sel in plan.chunks():
                logp, lse_p = _log_softmax_rows(
                    _project(_rows(h, sel), w, b, cdtype, temperature), None, True
                )
                logq, lse_q = _log_softmax_rows(
                    _project(_rows(hr, sel), wr, br, cdtype, temperature), None, True
                )
                d = _chunk_value(div, VocabChunk(logp, logq, log_cap))
                if plan.dense:
                    out[sel], lse[0, sel], lse[1, sel] = d, lse_p, lse_q
                else:
                    out.index_copy_(0, sel, d)
                    lse[0].index_copy_(0, sel, lse_p)
                    lse[1].index_copy_(0, sel, lse_q)
        ctx.save_for_backward(h, w, b, hr, wr, br, lse)
        ctx.plan, ctx.div, ctx.temperature, ctx.log_cap = plan, div, temperature, log_cap
        ctx.mark_non_differentiable(lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, w, b, hr, wr, br, lse = ctx.saved_tensors
        nig = ctx.needs_input_grad
        need_p, need_q = any(nig[0:3]), any(nig[3:6])
        plan: _Plan = ctx.plan
        cdtype = lse.dtype
        acc = torch.float64 if cdtype == torch.float64 else torch.float32
        g_h = torch.zeros(h.shape, dtype=acc, device=h.device) if nig[0] else None
        g_w = torch.zeros(w.shape, dtype=acc, device=w.device) if nig[1] else None
        g_b = torch.zeros(b.shape, dtype=acc, device=b.device) if (b is not None and nig[2]) else None
        g_hr = torch.zeros(hr.shape, dtype=acc, device=hr.device) if nig[3] else None
        g_wr = torch.zeros(wr.shape, dtype=acc, device=wr.device) if nig[4] else None
        g_br = torch.zeros(br.shape, dtype=acc, device=br.device) if (br is not None and nig[5]) else None
        scale_all = grad_out.to(cdtype) / ctx.temperature
        with torch.no_grad():
            for sel in plan.chunks():
                hs, hrs = _rows(h, sel), _rows(hr, sel)
                logp, _ = _log_softmax_rows(
                    _project(hs, w, b, cdtype, ctx.temperature), _rows(lse[0], sel), True
                )
                logq, _ = _log_softmax_rows(
                    _project(hrs, wr, br, cdtype, ctx.temperature), _rows(lse[1], sel), True
                )
                c = VocabChunk(logp, logq, ctx.log_cap)
                gp, gq = _chunk_grads(ctx.div, c, _rows(scale_all, sel).unsqueeze(-1), need_p, need_q)
                del c, logp, logq
                _accumulate(gp, hs, w, sel, g_h, g_w, g_b)
                _accumulate(gq, hrs, wr, sel, g_hr, g_wr, g_br)

        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else g.to(like.dtype)

        return (cast(g_h, h), cast(g_w, w), cast(g_b, b), cast(g_hr, hr), cast(g_wr, wr), cast(g_br, br),
                None, None, None, None)  # fmt: skip


def _accumulate(
    gz: Tensor | None,
    hs: Tensor,
    weight: Tensor,
    sel: slice | Tensor,
    g_h: Tensor | None,
    g_w: Tensor | None,
    g_b: Tensor | None,
) -> None:
    """Chain rule through z = h Wᵀ + b for one chunk: dh = dz W, dW += dzᵀ h, db += Σ dz."""
    if gz is None:
        return
    if g_h is not None:
        dh = gz.to(weight.dtype) @ weight
        if isinstance(sel, slice):
            g_h[sel] += dh
        else:
            g_h.index_add_(0, sel, dh.to(g_h.dtype))
    if g_w is not None:
        g_w.addmm_(gz.t().to(g_w.dtype), hs.to(g_w.dtype))
    if g_b is not None:
        g_b += gz.sum(dim=0).to(g_b.dtype)


def full_vocab_divergence_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ref_hidden: Tensor,
    ref_lm_head_weight: Tensor,
    divergence: str | Divergence,
    mask: Tensor | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    ref_lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position D_f(π ‖ π_ref) from final hidden states, never materialising full logits.

    π = softmax((hidden @ lm_head_weightᵀ + lm_head_bias)/T) and likewise for π_ref. Shapes:
    hidden (..., H), lm_head_weight (V, H), ref_hidden (..., H_ref), ref_lm_head_weight (V, H_ref)
    (the two models may have different hidden sizes but share the vocabulary). The projection
    runs chunk by chunk in the weights' dtype (as the model's own LM head would), the divergence in
    float32 (float64 for float64 inputs); gradients of the hidden states, weights and biases of
    whichever side requires grad are accumulated in float32 and returned in their own dtype.
    Returns (...) per-position values (float32/float64); masked positions give 0.
    """
    div = resolve_divergence(divergence)
    lead = hidden.shape[:-1]
    if ref_hidden.shape[:-1] != lead:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} differ in positions"
        )
    if lm_head_weight.shape[0] != ref_lm_head_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: {lm_head_weight.shape[0]} (policy) vs {ref_lm_head_weight.shape[0]} (ref)"
        )
    if hidden.shape[-1] != lm_head_weight.shape[1] or ref_hidden.shape[-1] != ref_lm_head_weight.shape[1]:
        raise ValueError(
            "hidden size does not match the LM head weight (expected weight of shape (vocab, hidden))"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = lm_head_weight.shape[0]
    rows = chunk_size or default_chunk_size(vocab, hidden.device)
    out = _FullVocabFromHidden.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_lm_head_weight,
        ref_lm_head_bias,
        _flat_mask(mask, lead),
        div,
        int(rows),
        float(temperature),
    )
    return out.reshape(lead)
