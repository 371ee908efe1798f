"""The chunking shared by both full-vocabulary paths (fdpo/divergences/full_vocab.py, full_vocab_hidden.py).

The memory budget that sets the chunk size (:func:`default_chunk_size`), the compute dtype and log
cap, the per-chunk value/gradient terms (docs/objectives.md §1.1), and the row helpers that scale and
store them. The module docstring of fdpo/divergences/full_vocab.py states the formulas and the memory
and numerics contract.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from fdpo.divergences.base import LOG_ZERO, Divergence, VocabChunk
from fdpo.divergences.numerics import SAFE_FRACTION

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


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def log_cap(dtype: torch.dtype, vocab: int) -> float:
    return math.log(torch.finfo(dtype).max * SAFE_FRACTION / max(vocab, 1))


@dataclass(frozen=True)
class ChunkSetup:
    """What every chunk of one call shares: the divergence, the temperature, the per-term cap and
    the compute dtype."""

    div: Divergence
    temperature: float
    log_cap: float
    dtype: torch.dtype


class ChunkPlan:
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


def select_rows(x: Tensor, sel: slice | Tensor) -> Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def chunk_log_softmax(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool) -> Tensor:
    """log softmax(z / T) of a chunk (rows, vocab) in ``dtype``, floored at LOG_ZERO (a fresh tensor).
    ``owned``: z is a temporary that may be overwritten."""
    if z.dtype != dtype:
        z, owned = z.to(dtype), True
    if temperature != 1.0:
        z = z.div_(temperature) if owned else z / temperature
    return torch.log_softmax(z, dim=-1).clamp_(min=LOG_ZERO)


def chunk_terms(
    setup: ChunkSetup,
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
        scale_in_place(out_q, scale)
    if out_p is not None:
        torch.addcmul(b, c.p, b.sum(dim=-1, keepdim=True), value=-1.0, out=out_p)
        scale_in_place(out_p, scale)
    return value


def scale_in_place(x: Tensor, scale: Tensor | float) -> None:
    if isinstance(scale, Tensor) or scale != 1.0:
        x.mul_(scale)


def store_rows(buf: Tensor, sel: slice | Tensor, value: Tensor) -> None:
    if isinstance(sel, slice):
        if value.data_ptr() != buf[sel].data_ptr():
            buf[sel].copy_(value)
    else:
        buf.index_copy_(0, sel, value.to(buf.dtype))


def out_rows(
    buf: Tensor | None, sel: slice | Tensor, rows: int, vocab: int, dtype: torch.dtype
) -> Tensor | None:
    """Where a chunk's gradient is written: the buffer rows themselves when possible, else a temporary."""
    if buf is None:
        return None
    if isinstance(sel, slice) and buf.dtype == dtype:
        return buf[sel]
    return torch.empty(rows, vocab, dtype=dtype, device=buf.device)


def chunk_scale(scale_all: Tensor | float, sel: slice | Tensor) -> Tensor | float:
    return select_rows(scale_all, sel).unsqueeze(-1) if isinstance(scale_all, Tensor) else scale_all


def scale_rows(grads: tuple[Tensor | None, ...], grad_out: Tensor) -> None:
    """Row i of each gradient buffer times grad_out[i] (skipped when grad_out ≡ 1)."""
    if bool((grad_out == 1).all()):
        return
    for g in grads:
        if g is not None:
            g.mul_(grad_out.reshape(-1, *([1] * (g.dim() - 1))))


def flatten_mask(mask: Tensor | None, lead: torch.Size) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(lead)}")
    return mask.reshape(-1).bool()
