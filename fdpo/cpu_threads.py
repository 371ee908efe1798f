"""torch's intra-op thread count for one run on a CPU (the `cpu_threads` recipe key).

Tiny models gain nothing from several threads, and with 2 threads on a busy 2-core machine OpenMP's
spin-waiting makes each tiny step 10-100x slower; the tiny recipes therefore set `cpu_threads: 1`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int | None, *, key: str = "cpu_threads") -> Iterator[None]:
    """Run the block with `threads` intra-op threads on a CPU-only machine, then restore the previous setting.

    None, or a machine with a GPU, leaves torch as it is. A value below 1 is an error naming `key`.
    """
    import torch

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"key '{key}' must be an integer ≥ 1 (or null for torch's default), got {threads!r}.")
    if threads is None or torch.cuda.is_available():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
