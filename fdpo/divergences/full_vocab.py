"""Exact full-vocabulary divergence per position, in chunks of positions (docs/objectives.md §1.1).

    D_f(p ‖ q)[b, t] = Σ_v q_v f(p_v / q_v),   p = softmax(z/T), q = softmax(z_ref/T)

The FIRST distribution is the π slot of the fdpo convention (the policy, or the student in
distillation), the second the π_ref slot (reference or teacher). Gradients flow to whichever
argument requires them (both may: on-policy distillation with a trainable teacher, or a learned
reference).

Gradients use closed forms, not autograd:

    ∂D/∂log p_v = p_v f′(u_v) =: B_v                     (Divergence.vocab_dlogp)
    ∂D/∂log q_v = q_v f(u_v) − p_v f′(u_v) = A_v − B_v     (A = Divergence.vocab_value)
    ∂D/∂z_v     = (B_v − p_v Σ_w B_w) / T,   ∂D/∂z_ref,v = (C_v − q_v Σ_w C_w) / T,  C = A − B.

Memory. Both functions are custom ``torch.autograd.Function`` s that keep no autograd graph and
run over chunks of positions. From logits, when a gradient will be needed, the forward pass computes
each chunk's value AND its gradient ∂D_i/∂z_i and writes the gradient straight into one
preallocated gradient buffer (the tensor that backward returns); backward only scales row i by the
upstream gradient g_i (exact: D_i depends on row i alone), and skips even that when g ≡ 1. So every
chunk is computed once, and the peak memory beyond the inputs and that buffer is one chunk's working
set. Its size is set by a memory budget (:func:`default_chunk_size`): at most ``LIVE_CHUNK_TENSORS``
(chunk, vocab) temporaries are alive at once for any registered divergence (a test measures it with
the allocator's own accounting), and the chunk is sized so that they fit in
min(``CHUNK_BUDGET_BYTES``, 1/``CHUNK_BUDGET_FRACTION`` of one full (positions, vocab) tensor).
Masked positions are skipped (value 0, gradient 0). A second backward through the same graph
(``retain_graph=True``), or a forward run without gradients enabled, recomputes chunk by chunk.

Numerics: the math runs in float32 (float64 if an input is float64) whatever the logits' dtype;
log-probabilities are floored at ``LOG_ZERO`` = −1e4 so that −inf logits give 0 contributions
(a token with p = 0 < q under forward KL then costs ≈ q·1e4 instead of +∞); each per-token term
is capped at finfo.max/16/vocab so a row sum never overflows. The result is float32 (float64).

Speed: per chunk the work is ~15–25 element-wise kernels over (chunk, vocab) tensors that stay in
cache, so it is faster than the one-shot computation over full tensors, which streams several
full tensors through memory (see ``benchmarks/bench_divergences.py``). On a CPU shared with other
busy processes, OpenMP's default spin-waiting can make each small parallel region slow (seen: 10×);
run with ``OMP_WAIT_POLICY=PASSIVE`` or fewer threads (``torch.set_num_threads``).

``full_vocab_divergence_from_hidden`` fuses the LM-head projection: it never materialises the
(batch, seq, vocab) logits of either model, projects chunk by chunk, and returns gradients for the
hidden states, the LM-head weights and biases of whichever side requires them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fdpo.divergences.base import Divergence
from fdpo.divergences.full_vocab_chunks import (
    CHUNK_BUDGET_BYTES,
    CHUNK_BUDGET_FRACTION,
    LIVE_CHUNK_TENSORS,
    ChunkPlan,
    ChunkSetup,
    chunk_log_softmax,
    chunk_scale,
    chunk_terms,
    compute_dtype,
    default_chunk_size,
    flatten_mask,
    log_cap,
    out_rows,
    scale_rows,
    select_rows,
    store_rows,
)
from fdpo.divergences.full_vocab_hidden import full_vocab_divergence_from_hidden
from fdpo.divergences.registry import resolve_divergence

# ---------------------------------------------------------------------------------------------
# from logits
# ---------------------------------------------------------------------------------------------


def _logits_pass(
    z: Tensor,
    zr: Tensor,
    plan: ChunkPlan,
    setup: ChunkSetup,
    want_value: bool,
    scale_all: Tensor | float,
    gz: Tensor | None,
    gzr: Tensor | None,
) -> Tensor | None:
    """One pass over the chunks: per-position values (when ``want_value``) and, into ``gz``/``gzr``,
    the rows scale_i·∂D_i/∂z_i and scale_i·∂D_i/∂z_ref,i."""
    n, vocab = z.shape
    cdtype, temperature = setup.dtype, setup.temperature
    out = torch.zeros(n, dtype=cdtype, device=z.device) if want_value else None
    with torch.no_grad():
        for sel in plan.chunks():
            owned = not isinstance(sel, slice)
            logp = chunk_log_softmax(select_rows(z, sel), cdtype, temperature, owned)
            logq = chunk_log_softmax(select_rows(zr, sel), cdtype, temperature, owned)
            rows = logp.shape[0]
            out_p = out_rows(gz, sel, rows, vocab, cdtype)
            out_q = out_rows(gzr, sel, rows, vocab, cdtype)
            d = chunk_terms(setup, logp, logq, want_value, chunk_scale(scale_all, sel), out_p, out_q)
            del logp, logq
            if out is not None:
                store_rows(out, sel, d)
            if out_p is not None:
                store_rows(gz, sel, out_p)
            if out_q is not None:
                store_rows(gzr, sel, out_q)
    return out


class _FullVocabFromLogits(torch.autograd.Function):
    """Values per position. With ``eager`` (a gradient will be needed), the gradients of each row are
    computed in the same pass, into the buffers backward returns after scaling their rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        zr: Tensor,
        mask: Tensor | None,
        div: Divergence,
        chunk_rows: int,
        temperature: float,
        eager: tuple[bool, bool],
    ) -> Tensor:
        n, vocab = z.shape
        cdtype = compute_dtype(z, zr)
        setup = ChunkSetup(div, temperature, log_cap(cdtype, vocab), cdtype)
        plan = ChunkPlan(n, mask, chunk_rows, z.device)
        gz = plan.grad_buffer(z) if eager[0] else None
        gzr = plan.grad_buffer(zr) if eager[1] else None
        out = _logits_pass(z, zr, plan, setup, True, 1.0 / temperature, gz, gzr)
        ctx.save_for_backward(z, zr)
        ctx.plan, ctx.setup, ctx.eager_grads = plan, setup, (gz, gzr)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        need = ctx.needs_input_grad[:2]
        grads, ctx.eager_grads = ctx.eager_grads, (None, None)  # give the buffers away (no copy)
        if all(g is not None or not nd for g, nd in zip(grads, need)):
            grads = tuple(g if nd else None for g, nd in zip(grads, need))
            scale_rows(grads, grad_out)
            return (*grads, None, None, None, None, None)
        z, zr = ctx.saved_tensors  # no eager gradients (or a second backward): recompute
        gz = ctx.plan.grad_buffer(z) if need[0] else None
        gzr = ctx.plan.grad_buffer(zr) if need[1] else None
        scale_all = grad_out.to(ctx.setup.dtype) / ctx.setup.temperature
        _logits_pass(z, zr, ctx.plan, ctx.setup, False, scale_all, gz, gzr)
        return gz, gzr, None, None, None, None, None


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
        chunk_size: positions per chunk (default: :func:`default_chunk_size`, from a memory budget).
        temperature: both distributions are softmax(logits / temperature).

    Returns:
        (...) tensor of per-position divergences, float32 (float64 for float64 inputs).

    When grad is enabled and a side requires it, its gradient is computed in this forward pass
    (held until backward, which returns it; see the module docstring). For a value that is only
    logged, call it under ``torch.no_grad()`` or on detached logits, so that no gradient is made.

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
    flat_mask = flatten_mask(mask, lead)
    cdtype = compute_dtype(policy_logits, ref_logits)
    n_rows = policy_logits.numel() // max(vocab, 1)
    rows = chunk_size or default_chunk_size(vocab, policy_logits.device, n_rows, cdtype.itemsize)
    grad_on = torch.is_grad_enabled()
    out = _FullVocabFromLogits.apply(
        policy_logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        flat_mask,
        div,
        int(rows),
        float(temperature),
        (grad_on and policy_logits.requires_grad, grad_on and ref_logits.requires_grad),
    )
    return out.reshape(lead)

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "CHUNK_BUDGET_FRACTION",
    "LIVE_CHUNK_TENSORS",
    "default_chunk_size",
    "full_vocab_divergence",
    "full_vocab_divergence_from_hidden",
]
