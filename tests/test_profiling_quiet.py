"""The CPU memory profiler keeps kineto's `USDT … profiler_start/stop` lines off stderr, and only those."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, torch
from fdpo.divergences.profiling import cpu_memory_profile, peak_memory, allocator_trace_peak
_, peak, live = peak_memory(lambda: torch.ones(1000) * 2)
with cpu_memory_profile() as prof:
    os.write(2, b"a line of someone else's\\n")  # written while the profiler runs: passed on
    x = torch.ones(250)
print(peak, live, *allocator_trace_peak(prof))
"""


def test_profiler_markers_dropped_other_stderr_kept():
    # KINETO_LOG_LEVEL=3 also shows kineto's STAGE lines, which must still come through
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KINETO_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "profiler_start" not in run.stderr and "profiler_stop" not in run.stderr
    assert "a line of someone else's" in run.stderr and "Completed Stage" in run.stderr
    peak, live, _peak2, live2 = map(int, run.stdout.split())
    assert peak >= 2 * 4000  # ones(1000) and the product (fp32) alive together
    assert live == 4000 and live2 == 1000  # what is still held: the product; x
