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

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fdpo.divergences.base import LOG_ZERO, Divergence, VocabChunk
from fdpo.divergences.numerics import SAFE_FRACTION
from fdpo.divergences.registry import resolve_divergence

#: at most this many (chunk, vocab) tensors are alive at once while one chunk is computed, for
#: every registered divergence, either side carrying the gradient (measured by
#: tests/test_divergences_full_vocab.py with the allocator's accounting). Entries that rely on the
#: generic ``Divergence.vocab_value``/``vocab_dlogp`` may use a few more.
LIVE_CHUNK_TENSORS = 9
#: cap on one chunk's working set (LIVE_CHUNK_TENSORS × chunk × vocab × itemsize), in bytes: on CPU
#: each (chunk, vocab) tensor then stays near the per-core cache (~1 MiB), which is what makes the
#: chunked pass faster than the one-shot computation (2-core EPYC, vocab 32000, reverse KL fwd+bwd:
#: 7 rows per chunk was ~10% faster than 29 and ~25% faster than 128); on accelerators it is larger,
#: to amortise kernel launches.
CHUNK_BUDGET_BYTES = {"cpu": 8 * 2**20, "accelerator": 512 * 2**20}
#: ... and the working set is at most this fraction of one full (positions, vocab) tensor, so that
#: small inputs are chunked too (a one-shot computation needs at least 2 such tensors).
CHUNK_BUDGET_FRACTION = 8


def default_chunk_size(
    vocab: int,
    device: torch.device | str = "cpu",
    n_rows: int | None = None,
    itemsize: int = 4,
    min_rows: int = 1,
) -> int:
    """Positions per chunk from the memory budget: LIVE_CHUNK_TENSORS × rows × vocab × itemsize ≤
    min(CHUNK_BUDGET_BYTES, n_rows × vocab × itemsize / CHUNK_BUDGET_FRACTION), at least ``min_rows``."""
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    row_bytes = max(vocab, 1) * itemsize
    budget = CHUNK_BUDGET_BYTES[kind]
    if n_rows is not None:
        budget = min(budget, n_rows * row_bytes // CHUNK_BUDGET_FRACTION)
    return max(1, min_rows, budget // (LIVE_CHUNK_TENSORS * row_bytes))


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _log_cap(dtype: torch.dtype, vocab: int) -> float:
    return math.log(torch.finfo(dtype).max * SAFE_FRACTION / max(vocab, 1))


@dataclass(frozen=True)
class _Setup:
    """What every chunk of one call shares: the divergence, the temperature, the per-term cap and
    the compute dtype."""

    div: Divergence
    temperature: float
    log_cap: float
    dtype: torch.dtype


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

    def grad_buffer(self, like: Tensor) -> Tensor:
        """The gradient tensor for ``like`` (masked rows stay 0)."""
        return torch.empty_like(like) if self.dense else torch.zeros_like(like)


def _rows(x: Tensor, sel: slice | Tensor) -> Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _log_softmax(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool) -> Tensor:
    """log softmax(z / T) of a chunk (rows, vocab) in ``dtype``, floored at LOG_ZERO (a fresh tensor).
    ``owned``: z is a temporary that may be overwritten."""
    if z.dtype != dtype:
        z, owned = z.to(dtype), True
    if temperature != 1.0:
        z = z.div_(temperature) if owned else z / temperature
    return torch.log_softmax(z, dim=-1).clamp_(min=LOG_ZERO)


def _chunk_terms(
    setup: _Setup,
    logp: Tensor,
    logq: Tensor,
    want_value: bool,
    scale: Tensor | float,
    out_p: Tensor | None,
    out_q: Tensor | None,
) -> Tensor | None:
    """One chunk (rows, vocab): returns the per-row values Σ_v A_v when ``want_value``, and writes
    scale·∂D/∂z into ``out_p`` and scale·∂D/∂z_ref into ``out_q`` (compute-dtype (rows, vocab)
    tensors, typically views of the gradient buffers) when given. ``scale``: a number or (rows, 1).

    Few live temporaries: A is freed as soon as it is summed unless C = A − B needs it, and both
    gradients are formed directly in their output tensors."""
    div = setup.div
    c = VocabChunk(logp, logq, setup.log_cap)
    value = None
    a = None
    if want_value or out_q is not None:
        a = div.vocab_value(c)
        if want_value:
            value = a.sum(dim=-1)
        if out_q is None:
            a = None
    if out_p is None and out_q is None:
        return value
    b = div.vocab_dlogp(c)
    if out_q is not None:
        torch.sub(a, b, out=out_q)
        a = None
        out_q.addcmul_(c.q, out_q.sum(dim=-1, keepdim=True), value=-1.0)
        _scale(out_q, scale)
    if out_p is not None:
        torch.addcmul(b, c.p, b.sum(dim=-1, keepdim=True), value=-1.0, out=out_p)
        _scale(out_p, scale)
    return value


def _scale(x: Tensor, scale: Tensor | float) -> None:
    if isinstance(scale, Tensor) or scale != 1.0:
        x.mul_(scale)


def _store(buf: Tensor, sel: slice | Tensor, value: Tensor) -> None:
    if isinstance(sel, slice):
        if value.data_ptr() != buf[sel].data_ptr():
            buf[sel].copy_(value)
    else:
        buf.index_copy_(0, sel, value.to(buf.dtype))


def _out_rows(
    buf: Tensor | None, sel: slice | Tensor, rows: int, vocab: int, dtype: torch.dtype
) -> Tensor | None:
    """Where a chunk's gradient is written: the buffer rows themselves when possible, else a temporary."""
    if buf is None:
        return None
    if isinstance(sel, slice) and buf.dtype == dtype:
        return buf[sel]
    return torch.empty(rows, vocab, dtype=dtype, device=buf.device)


def _chunk_scale(scale_all: Tensor | float, sel: slice | Tensor) -> Tensor | float:
    return _rows(scale_all, sel).unsqueeze(-1) if isinstance(scale_all, Tensor) else scale_all


def _scale_rows(grads: tuple[Tensor | None, ...], grad_out: Tensor) -> None:
    """Row i of each gradient buffer times grad_out[i] (skipped when grad_out ≡ 1)."""
    if bool((grad_out == 1).all()):
        return
    for g in grads:
        if g is not None:
            g.mul_(grad_out.reshape(-1, *([1] * (g.dim() - 1))))


# ---------------------------------------------------------------------------------------------
# from logits
# ---------------------------------------------------------------------------------------------


def _logits_pass(
    z: Tensor,
    zr: Tensor,
    plan: _Plan,
    setup: _Setup,
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
            logp = _log_softmax(_rows(z, sel), cdtype, temperature, owned)
            logq = _log_softmax(_rows(zr, sel), cdtype, temperature, owned)
            rows = logp.shape[0]
            out_p = _out_rows(gz, sel, rows, vocab, cdtype)
            out_q = _out_rows(gzr, sel, rows, vocab, cdtype)
            d = _chunk_terms(setup, logp, logq, want_value, _chunk_scale(scale_all, sel), out_p, out_q)
            del logp, logq
            if out is not None:
                _store(out, sel, d)
            if out_p is not None:
                _store(gz, sel, out_p)
            if out_q is not None:
                _store(gzr, sel, out_q)
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
        cdtype = _compute_dtype(z, zr)
        setup = _Setup(div, temperature, _log_cap(cdtype, vocab), cdtype)
        plan = _Plan(n, mask, chunk_rows, z.device)
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
            _scale_rows(grads, grad_out)
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
    flat_mask = _flat_mask(mask, lead)
    cdtype = _compute_dtype(policy_logits, ref_logits)
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


def _flat_mask(mask: Tensor | None, lead: torch.Size) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)}")
    return mask.reshape(-1).bool()


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
        return _log_softmax(h, dtype, temperature, owned=False)
    h = h.to(weight.dtype)
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    return _log_softmax(z, dtype, temperature, owned=True)


def _zeros_like_if(x: Tensor | None, needed: bool, dtype: torch.dtype) -> Tensor | None:
    return torch.zeros(x.shape, dtype=dtype, device=x.device) if (x is not None and needed) else None


def _hidden_pass(
    tensors: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None],
    plan: _Plan,
    setup: _Setup,
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
        hs, hrs = _rows(h, sel), _rows(hr, sel)
        logp = _project_log_softmax(hs, w, b, cdtype, temperature)
        logq = _project_log_softmax(hrs, wr, br, cdtype, temperature)
        gp = torch.empty_like(logp) if need_p else None
        gq = torch.empty_like(logq) if need_q else None
        scale = _rows(scale_all, sel).unsqueeze(-1) if scale_all is not None else 1.0
        d = _chunk_terms(setup, logp, logq, want_value, scale, gp, gq)
        del logp, logq
        if out is not None:
            _store(out, sel, d)
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
        cdtype = _compute_dtype(h, w, hr, wr)
        setup = _Setup(div, temperature, _log_cap(cdtype, w.shape[0]), cdtype)
        plan = _Plan(h.shape[0], mask, chunk_rows, h.device)
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
            _scale_rows(tuple(grads), grad_out.reshape(1) if ctx.reduced else grad_out)
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
        _compute_dtype(hidden, lm_head_weight).itemsize,
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
        _flat_mask(mask, lead),
        None if weights is None else weights.detach(),
        eager,
        div,
        int(rows),
        float(temperature),
    )
    return out if reduction == "sum" else out.reshape(lead)
