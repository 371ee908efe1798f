"""Peak memory of a callable as torch's allocator sees it (used by the memory tests of the chunked
full-vocabulary paths and by ``benchmarks/bench_divergences.py``).

On CUDA: ``torch.cuda.max_memory_allocated`` around the call. On CPU, torch keeps no such counter
and process RSS is a poor proxy (glibc keeps freed blocks below its mmap threshold, the Python heap
and libraries move it), so the call runs under ``torch.profiler.profile(profile_memory=True)``,
which records every allocation and free of torch's CPU allocator, in order, with its size (also
the allocations inside kernels and in the autograd engine); the running sum of those sizes is the
live memory, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda x: x[0]):
        live += nbytes
        peak = max(peak, live)
    return out, peak, live
