"""`python -m tests.ddp_sampling train RECIPE ...`: `fdpo` with rollout sampling that does not depend on the
number of processes (a test harness for tests/test_grpo_ddp.py; not a test module itself).

TRL 1.16 seeds every process with ``seed + process_index`` (``set_seed(seed, device_specific=True)``) and
samples its own rows with ``torch.multinomial`` on the whole local batch, so a 2-process run draws different
completions than a 1-process run of the same global batch. Here, inside ``generate`` only, the categorical draw
of row ``r`` on process ``k`` (global row ``k·B + r``) at token ``t`` of generate call ``c`` uses a uniform from
its own generator seeded by ``(c, global row, t)``, inverted through the row's CDF: the same global row gets
the same completion whatever the world size (up to a uniform landing within float noise of a CDF step). Everything else
(forward passes, rewards, group advantages, loss normalisation, DDP gradient averaging, logging) is fdpo/TRL as is.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers.generation.utils import GenerationMixin

_state = {"call": -1, "token": 0}
_multinomial = torch.multinomial


def _row_invariant_multinomial(probs: torch.Tensor, num_samples: int = 1, replacement: bool = False, **kwargs):
    if num_samples != 1 or probs.dim() != 2 or kwargs.get("generator") is not None:
        return _multinomial(probs, num_samples, replacement, **kwargs)
    rank = int(os.environ.get("RANK", "0"))
    rows = probs.shape[0]
    u = torch.empty(rows, 1, dtype=torch.float64)
    for r in range(rows):
        seed = (_state["call"] * 100_003 + rank * rows + r) * 1_009 + _state["token"]
        u[r, 0] = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _state["token"] += 1
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, u.to(probs.device) * cdf[:, -1:])
    return idx.clamp_(max=probs.shape[-1] - 1)


_generate = GenerationMixin.generate


def _generate_row_invariant(self, *args, **kwargs):
    _state["call"] += 1
    _state["token"] = 0
    torch.multinomial = _row_invariant_multinomial
    try:
        return _generate(self, *args, **kwargs)
    finally:
        torch.multinomial = _multinomial


GenerationMixin.generate = _generate_row_invariant

if __name__ == "__main__":
    from fdpo.cli import main

    sys.exit(main(sys.argv[1:]))
