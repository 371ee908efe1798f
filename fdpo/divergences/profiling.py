"""Peak memory of a callable as torch's allocator sees it (used by the memory tests of the chunked
full-vocabulary paths and by ``benchmarks/bench_divergences.py``).

On CUDA: ``torch.cuda.max_memory_allocated`` around the call. On CPU, torch keeps no such counter
and process RSS is a poor proxy (glibc keeps freed blocks below its mmap threshold, the Python heap
and libraries move it), so the call runs under ``torch.profiler.profile(profile_memory=True)``,
which records every allocation and free of torch's CPU allocator, in order, with its size (also
the allocations inside kernels and in the autograd engine); the running sum of those sizes is the
live memory, exactly.

kineto, the profiler's backend, writes a `USDT:… profiler_start` / `… profiler_stop` line to the
process's stderr (file descriptor 2, under Python's `sys.stderr`) at every start and stop, whatever
`KINETO_LOG_LEVEL` short of silencing its errors too; between a benchmark's table rows that is noise.
`cpu_memory_profile` starts and stops the profiler with just those two lines dropped (anything else
kineto writes there is passed on).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_KINETO_MARKER = re.compile(r"USDT:.*\] profiler_(start|stop)\s*$")


@contextmanager
def _without_kineto_markers() -> Iterator[None]:
    """Capture fd 2 for the block; pass on every line but kineto's profiler_start/stop markers."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not _KINETO_MARKER.match(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextmanager
def cpu_memory_profile() -> Iterator[Any]:
    """``torch.profiler.profile(CPU, profile_memory=True)`` around the block, without kineto's markers."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _without_kineto_markers():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _without_kineto_markers():
            prof.__exit__(None, None, None)


def allocator_trace_peak(prof: Any) -> tuple[int, int]:
    """(peak, final) live bytes of torch's CPU allocator in a finished `cpu_memory_profile` trace."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda x: x[0]):
        live += nbytes
        peak = max(peak, live)
    return peak, live


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int, int]:
    """Run ``fn()``; return (its result, peak bytes, net bytes) of torch memory on ``device``,
    both relative to the moment before the call (net: still allocated when it returns)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures cpu or cuda, not {device.type}")
    with cpu_memory_profile() as prof:
        out = fn()
    peak, live = allocator_trace_peak(prof)
    return out, peak, live
