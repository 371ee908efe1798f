"""Full-vocabulary divergence from hidden states, with the LM-head projection fused (docs/objectives.md §1.1).

``full_vocab_divergence_from_hidden`` never materialises the (batch, seq, vocab) logits of either
model: it projects chunk by chunk and returns gradients for the hidden states, the LM-head weights
and biases of whichever side requires them. Formulas, memory and numerics: fdpo/divergences/full_vocab.py.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fdpo.divergences.base import Divergence
from fdpo.divergences.full_vocab_chunks import (
    ChunkPlan,
    ChunkSetup,
    chunk_log_softmax,
    chunk_terms,
    compute_dtype,
    default_chunk_size,
    flatten_mask,
    log_cap,
    scale_rows,
    select_rows,
    store_rows,
)
from fdpo.divergences.registry import resolve_divergence

# ---------------------------------------------------------------------------------------------
# from hidden states (fused LM-head projection)
# ---------------------------------------------------------------------------------------------

#: the fused path needs enough rows per chunk for the LM-head gradient dW += dzᵀh (a read-modify-
#: write of the whole (vocab, hidden) accumulator per chunk) to be compute- rather than memory-bound.
MIN_HIDDEN_CHUNK_ROWS = 64


def _project_log_softmax(
    h: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype, temperature: float
) -> Tensor:
    """log softmax((h Wᵀ + b)/T) of one chunk: the projection in the weights' dtype like the model's
    own LM head, the rest in the compute dtype. Without a weight, ``h`` already holds (rows, V)
    logits or log-probabilities."""
    if weight is None:
        return chunk_log_softmax(h, dtype, temperature, owned=False)
    h = h.to(weight.dtype)
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    return chunk_log_softmax(z, dtype, temperature, owned=True)


def _zeros_like_if(x: Tensor | None, needed: bool, dtype: torch.dtype) -> Tensor | None:
    return torch.zeros(x.shape, dtype=dtype, device=x.device) if (x is not None and needed) else None


def _hidden_pass(
    tensors: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None],
    plan: ChunkPlan,
    setup: ChunkSetup,
    want_value: bool,
    scale_all: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """One pass over the chunks: values (when ``want_value``) and, when ``scale_all`` is given, the
    gradients Σ_i scale_i ∂D_i/∂(h, W, b, h_ref, W_ref, b_ref) for ``needs``."""
    h, w, b, hr, wr, br = tensors
    n, cdtype, temperature = h.shape[0], setup.dtype, setup.temperature
    needs = needs or (False,) * 6
    out = torch.zeros(n, dtype=cdtype, device=h.device) if want_value else None
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    grads = [_zeros_like_if(t, scale_all is not None and need, acc) for t, need in zip(tensors, needs)]
    need_p, need_q = scale_all is not None and any(needs[0:3]), scale_all is not None and any(needs[3:6])
    for sel in plan.chunks():
        hs, hrs = select_rows(h, sel), select_rows(hr, sel)
        logp = _project_log_softmax(hs, w, b, cdtype, temperature)
        logq = _project_log_softmax(hrs, wr, br, cdtype, temperature)
        gp = torch.empty_like(logp) if need_p else None
        gq = torch.empty_like(logq) if need_q else None
        scale = select_rows(scale_all, sel).unsqueeze(-1) if scale_all is not None else 1.0
        d = chunk_terms(setup, logp, logq, want_value, scale, gp, gq)
        del logp, logq
        if out is not None:
            store_rows(out, sel, d)
        _accumulate(gp, hs, w, sel, *grads[0:3])
        del gp
        _accumulate(gq, hrs, wr, sel, *grads[3:6])
    return out, grads


class _FullVocabFromHidden(torch.autograd.Function):
    """Per-position values, gradients recomputed chunk by chunk in backward (the LM-head gradient
    Σ_i g_i ∂D_i/∂W needs the upstream g before the sum over positions); or, with ``weights``
    given (a weighted sum is wanted), one scalar Σ_i w_i D_i whose gradients are computed in the
    same pass as the value (no recomputation; backward only scales them by the upstream scalar)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        hr: Tensor,
        wr: Tensor | None,
        br: Tensor | None,
        mask: Tensor | None,
        weights: Tensor | None,
        eager: bool,
        div: Divergence,
        chunk_rows: int,
        temperature: float,
    ) -> Tensor:
        tensors = (h, w, b, hr, wr, br)
        cdtype = compute_dtype(h, w, hr, wr)
        setup = ChunkSetup(div, temperature, log_cap(cdtype, w.shape[0]), cdtype)
        plan = ChunkPlan(h.shape[0], mask, chunk_rows, h.device)
        ctx.plan, ctx.setup = plan, setup
        ctx.reduced = weights is not None
        ctx.save_for_backward(h, w, b, hr, wr, br)
        ctx.eager_grads = None
        with torch.no_grad():
            if weights is None:
                # per-position values: gradients that are per-row (hidden states, reference logits)
                # can be computed now and scaled by the upstream gradient in backward; an LM-head
                # gradient Σ_i g_i ∂D_i/∂W cannot, so then backward recomputes
                needs = tuple(t is not None and t.requires_grad for t in tensors) if eager else (False,) * 6
                rows_only = any(needs) and not any(needs[i] for i in (1, 2, 4, 5))
                scale = torch.full((h.shape[0],), 1.0 / temperature, dtype=cdtype, device=h.device)
                out, grads = _hidden_pass(
                    tensors, plan, setup, True, scale if rows_only else None, needs if rows_only else ()
                )
                ctx.eager_grads = grads if rows_only else None
                return out
            scale = weights.reshape(-1).to(cdtype) / temperature
            needs = tuple(t is not None and t.requires_grad for t in tensors) if eager else (False,) * 6
            out, grads = _hidden_pass(tensors, plan, setup, True, scale, needs)
            ctx.eager_grads = grads if eager else None
            ctx.scale = scale
            return (out * weights.reshape(-1).to(cdtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        tensors = ctx.saved_tensors
        nig = ctx.needs_input_grad[:6]
        grads, ctx.eager_grads = ctx.eager_grads, None
        if grads is not None and all(g is not None or not need for g, need in zip(grads, nig)):
            scale_rows(tuple(grads), grad_out.reshape(1) if ctx.reduced else grad_out)
        else:
            g = grad_out.to(ctx.setup.dtype)
            scale_all = ctx.scale * g if ctx.reduced else g / ctx.setup.temperature
            with torch.no_grad():
                _, grads = _hidden_pass(tensors, ctx.plan, ctx.setup, False, scale_all, nig)
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
    recomputes both projections chunk by chunk when an LM head requires grad (its gradient
    Σ_i g_i ∂D_i/∂W needs the upstream g_i), else the per-row gradients are made in the forward pass. ``reduction="sum"`` returns the scalar
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
    rows = chunk_size or default_chunk_size(
        vocab,
        hidden.device,
        hidden.numel() // max(hidden.shape[-1], 1),
        compute_dtype(hidden, lm_head_weight).itemsize,
        min_rows=MIN_HIDDEN_CHUNK_ROWS,
    )
    inputs = (hidden, lm_head_weight, lm_head_bias, ref_hidden, ref_lm_head_weight, ref_lm_head_bias)
    eager = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    out = _FullVocabFromHidden.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head_weight,
        lm_head_bias,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_lm_head_weight,
        ref_lm_head_bias,
        flatten_mask(mask, lead),
        None if weights is None else weights.detach(),
        eager,
        div,
        int(rows),
        float(temperature),
    )
    return out if reduction == "sum" else out.reshape(lead)
