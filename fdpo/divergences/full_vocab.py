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

Speed: per chunk the work is ~25 element-wise kernels over (chunk, vocab) tensors that fit in
cache, so it is usually faster than the one-shot computation over full tensors (see
``benchmarks/bench_divergences.py``). On a CPU shared with other busy processes, OpenMP's default
spin-waiting can make each of these small parallel regions slow (seen: 10×); run with
``OMP_WAIT_POLICY=PASSIVE`` or fewer threads (``torch.set_num_threads``), or pass a larger
``chunk_size``.

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

#: default chunk, in (position × vocab) elements: 8 MiB per float32 tensor on CPU (the working
#: set of a chunk, ≈ 6 such tensors, stays near the last-level cache while the number of small
#: parallel regions stays low: with OpenMP's default spin-waiting, an oversubscribed CPU makes
#: every region slow; see the module docstring), 32 MiB on accelerators to amortise launches.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**21, "accelerator": 2**23}


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
    div: Divergence,
    c: VocabChunk,
    scale: Tensor,
    need_p: bool,
    need_q: bool,
    out_p: Tensor | None = None,
    out_q: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """d(Σ_rows scale·D)/dz for both sides of one chunk (rows, vocab), in the compute dtype.

    ``out_p``/``out_q``: optional slices of the gradient buffers (same dtype) written in place,
    which saves a copy; the returned tensors are then those slices.
    """
    b = div.vocab_dlogp(c)
    if b._base is not None or any(b is t for t in (*c.__dict__.values(), *c._memo.values())):
        b = b.clone()  # never modify a cached intermediate in place
    gq = None
    if need_q:
        gq = div.vocab_value(c) - b
        gq.addcmul_(c.q, gq.sum(dim=-1, keepdim=True), value=-1.0)
        gq = torch.mul(gq, scale, out=out_q) if out_q is not None else gq.mul_(scale)
    gp = None
    if need_p:
        b.addcmul_(c.p, b.sum(dim=-1, keepdim=True), value=-1.0)
        gp = torch.mul(b, scale, out=out_p) if out_p is not None else b.mul_(scale)
    return gp, gq


def _store(buf: Tensor, sel: slice | Tensor, value: Tensor) -> None:
    if isinstance(sel, slice):
        if value.data_ptr() != buf[sel].data_ptr():
            buf[sel].copy_(value)
    else:
        buf.index_copy_(0, sel, value.to(buf.dtype))


def _out_slice(buf: Tensor | None, sel: slice | Tensor, dtype: torch.dtype) -> Tensor | None:
    """A writable view of the buffer rows for ``sel`` when results can go there directly."""
    if buf is None or not isinstance(sel, slice) or buf.dtype != dtype:
        return None
    return buf[sel]


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
                gp, gq = _chunk_grads(
                    ctx.div,
                    c,
                    _rows(scale_all, sel).unsqueeze(-1),
                    need_p,
                    need_q,
                    out_p=_out_slice(gz, sel, cdtype),
                    out_q=_out_slice(gzr, sel, cdtype),
                )
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
    h: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype, temperature: float
) -> Tensor:
    """(rows, H) @ (V, H)ᵀ (+ b), in the weights' dtype like the model's own LM head, then the
    compute dtype, divided by T. Returns a fresh tensor. Without a weight, ``h`` already holds
    (rows, V) logits or log-probabilities."""
    if weight is None:
        z = h.to(dtype, copy=True)
        return z.div_(temperature) if temperature != 1.0 else z
    h = h.to(weight.dtype)
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    z = z.to(dtype)
    if temperature != 1.0:
        z = z.div_(temperature)
    return z


def _zeros_like_if(x: Tensor | None, needed: bool, dtype: torch.dtype) -> Tensor | None:
    return torch.zeros(x.shape, dtype=dtype, device=x.device) if (x is not None and needed) else None


def _hidden_pass(
    tensors: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor | None],
    plan: _Plan,
    div: Divergence,
    temperature: float,
    log_cap: float,
    cdtype: torch.dtype,
    lse: Tensor | None,
    scale_all: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """One pass over the chunks: values (when ``lse`` is None, filling it) and, when ``scale_all``
    is given, the gradients Σ_i scale_i ∂D_i/∂(h, W, b, h_ref, W_ref, b_ref) for ``needs``."""
    h, w, b, hr, wr, br = tensors
    n = h.shape[0]
    out = torch.zeros(n, dtype=cdtype, device=h.device)
    fill = lse is None
    if fill:
        lse = torch.zeros(2, n, dtype=cdtype, device=h.device)
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    grads = [_zeros_like_if(t, scale_all is not None and need, acc) for t, need in zip(tensors, needs)]
    need_p, need_q = scale_all is not None and any(needs[0:3]), scale_all is not None and any(needs[3:6])
    for sel in plan.chunks():
        hs, hrs = _rows(h, sel), _rows(hr, sel)
        known = (None, None) if fill else (_rows(lse[0], sel), _rows(lse[1], sel))
        logp, lse_p = _log_softmax_rows(_project(hs, w, b, cdtype, temperature), known[0], True)
        logq, lse_q = _log_softmax_rows(_project(hrs, wr, br, cdtype, temperature), known[1], True)
        c = VocabChunk(logp, logq, log_cap)
        if fill:
            d = _chunk_value(div, c)
            if plan.dense:
                out[sel], lse[0, sel], lse[1, sel] = d, lse_p, lse_q
            else:
                out.index_copy_(0, sel, d)
                lse[0].index_copy_(0, sel, lse_p)
                lse[1].index_copy_(0, sel, lse_q)
        if need_p or need_q:
            gp, gq = _chunk_grads(div, c, _rows(scale_all, sel).unsqueeze(-1), need_p, need_q)
            del c, logp, logq
            _accumulate(gp, hs, w, sel, *grads[0:3])
            _accumulate(gq, hrs, wr, sel, *grads[3:6])
    return out, lse, grads


class _FullVocabFromHidden(torch.autograd.Function):
    """Per-position values, gradients recomputed chunk by chunk in backward; or, with ``weights``
    given (a weighted sum is wanted), one scalar Σ_i w_i D_i whose gradients are computed in the
    same pass as the value (no recomputation; backward only scales them by the upstream scalar)."""

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
        weights: Tensor | None,
        eager: bool,
        div: Divergence,
        chunk_rows: int,
        temperature: float,
    ) -> Tensor:
        tensors = (h, w, b, hr, wr, br)
        cdtype = _compute_dtype(h, w, hr, wr)
        plan = _Plan(h.shape[0], mask, chunk_rows, h.device)
        log_cap = _log_cap(cdtype, w.shape[0])
        ctx.plan, ctx.div, ctx.temperature, ctx.log_cap = plan, div, temperature, log_cap
        ctx.reduced = weights is not None
        with torch.no_grad():
            if weights is None:
                out, lse, _ = _hidden_pass(tensors, plan, div, temperature, log_cap, cdtype, None, None, ())
                ctx.save_for_backward(h, w, b, hr, wr, br, lse)
                ctx.eager_grads = None
                return out
            scale = weights.reshape(-1).to(cdtype) / temperature
            needs = tuple(t is not None and t.requires_grad for t in tensors) if eager else (False,) * 6
            out, lse, grads = _hidden_pass(
                tensors, plan, div, temperature, log_cap, cdtype, None, scale, needs
            )
            ctx.eager_grads = grads
            ctx.save_for_backward(h, w, b, hr, wr, br, lse)
            ctx.scale = scale
            return (out * weights.reshape(-1).to(cdtype)).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        h, w, b, hr, wr, br, lse = ctx.saved_tensors
        tensors = (h, w, b, hr, wr, br)
        nig = ctx.needs_input_grad[:6]
        if ctx.eager_grads is not None and all(
            g is not None or not need for g, need in zip(ctx.eager_grads, nig)
        ):
            grads = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.eager_grads]
        else:
            if ctx.reduced:
                scale_all = ctx.scale * grad_out.to(lse.dtype)
            else:
                scale_all = grad_out.to(lse.dtype) / ctx.temperature
            with torch.no_grad():
                _, _, grads = _hidden_pass(
                    tensors, ctx.plan, ctx.div, ctx.temperature, ctx.log_cap, lse.dtype, lse, scale_all, nig
                )
        ctx.eager_grads = None
        out = [
            None if (g is None or t is None or not need) else g.to(t.dtype)
            for g, t, need in zip(grads, tensors, nig)
        ]
        return (*out, None, None, None, None, None, None)


def _accumulate(
    gz: Tensor | None,
    hs: Tensor,
    weight: Tensor | None,
    sel: slice | Tensor,
    g_h: Tensor | None,
    g_w: Tensor | None,
    g_b: Tensor | None,
) -> None:
    """Chain rule through z = h Wᵀ + b for one chunk: dh = dz W, dW += dzᵀ h, db += Σ dz
    (without a weight, z = h and dh = dz)."""
    if gz is None:
        return
    if g_h is not None:
        dh = gz if weight is None else gz.to(weight.dtype) @ weight
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
    ref_lm_head_weight: Tensor | None,
    divergence: str | Divergence,
    mask: Tensor | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    ref_lm_head_bias: Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    reduction: str = "none",
    weights: Tensor | None = None,
) -> Tensor:
    """Per-position D_f(π ‖ π_ref) from final hidden states, never materialising full logits.

    π = softmax((hidden @ lm_head_weightᵀ + lm_head_bias)/T) and likewise for π_ref. Shapes:
    hidden (..., H), lm_head_weight (V, H), ref_hidden (..., H_ref), ref_lm_head_weight (V, H_ref)
    (the two models may have different hidden sizes but share the vocabulary). With
    ``ref_lm_head_weight=None``, ``ref_hidden`` holds the reference's logits or log-probabilities
    (..., V) instead (e.g. precomputed teacher outputs); only the policy side is then fused. The projection
    runs chunk by chunk in the weights' dtype (as the model's own LM head would), the divergence in
    float32 (float64 for float64 inputs); gradients of the hidden states, weights and biases of
    whichever side requires grad are accumulated in float32 and returned in their own dtype.

    ``reduction="none"`` returns (...) per-position values (masked positions 0); the backward pass
    recomputes both projections chunk by chunk. ``reduction="sum"`` returns the scalar
    Σ_positions weights · D (``weights`` (...) defaults to 1, masked positions excluded) and, when
    gradients are needed, computes them in the same pass as the value: no recomputation, so about
    a third fewer matrix products, for the usual case of a loss that is a weighted sum (e.g.
    ``weights = mask / mask.sum()`` for a token mean).
    """
    div = resolve_divergence(divergence)
    lead = hidden.shape[:-1]
    if ref_hidden.shape[:-1] != lead:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} differ in positions"
        )
    ref_vocab = ref_hidden.shape[-1] if ref_lm_head_weight is None else ref_lm_head_weight.shape[0]
    if lm_head_weight.shape[0] != ref_vocab:
        raise ValueError(f"vocabulary sizes differ: {lm_head_weight.shape[0]} (policy) vs {ref_vocab} (ref)")
    if ref_lm_head_weight is None and ref_lm_head_bias is not None:
        raise ValueError("ref_lm_head_bias needs ref_lm_head_weight")
    if hidden.shape[-1] != lm_head_weight.shape[1] or (
        ref_lm_head_weight is not None and ref_hidden.shape[-1] != ref_lm_head_weight.shape[1]
    ):
        raise ValueError(
            "hidden size does not match the LM head weight (expected weight of shape (vocab, hidden))"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    if weights is not None and (reduction != "sum" or weights.shape != lead):
        raise ValueError(f"weights need reduction='sum' and the positions' shape {tuple(lead)}")
    if reduction == "sum" and weights is None:
        weights = torch.ones(lead, dtype=torch.float32, device=hidden.device)
    vocab = lm_head_weight.shape[0]
    rows = chunk_size or default_chunk_size(vocab, hidden.device)
    inputs = (hidden, lm_head_weight, lm_head_bias, ref_hidden, ref_lm_head_weight, ref_lm_head_bias)
    eager = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    out = _FullVocabFromHidden.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_lm_head_weight,
        ref_lm_head_bias,
        _flat_mask(mask, lead),
        None if weights is None else weights.detach(),
        eager,
        div,
        int(rows),
        float(temperature),
    )
    return out if reduction == "sum" else out.reshape(lead)
