"""`fdpo` under accelerate's FSDP2 path on the CPU (test launcher; not part of the package).

accelerate turns a launch with `configs/accelerate/fsdp.yaml` into FSDP only on GPU-like devices: on the
CPU (`ACCELERATE_USE_CPU`, gloo) `AcceleratorState` keeps MULTI_CPU and drops the FSDP plugin it was
given. This launcher restores that one decision (distributed type FSDP, the plugin built from the launch
environment, i.e. from fsdp.yaml) and then runs fdpo's CLI unchanged, so everything after it is
accelerate's own FSDP2 preparation (`fsdp2_prepare_model`: fully_shard per transformer block and the
root, the yaml's reshard/state-dict settings) and fdpo's trainers.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp_cpu.py train RECIPE [--key value ...]

GRPO rollouts go through tests/ddp_sampling.py (imported here), so a 2-process run samples what a 1-process
run of the same global batch samples.
"""

from __future__ import annotations

import sys

import ddp_sampling  # noqa: F401  (tests/ is this script's folder: rank-invariant rollouts for GRPO, as in the DDP tests)
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import Trainer

_init = AcceleratorState.__init__


_PLUGIN: list = []


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)  # every AcceleratorState() re-copies PartialState's MULTI_CPU: re-apply each time
    if kwargs.get("fsdp_plugin") is not None and not _PLUGIN:
        _PLUGIN.append(kwargs["fsdp_plugin"])
    if _PLUGIN and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _PLUGIN[0]


def _save_full(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
    """transformers 5.24's `save_pretrained` of an FSDP2 model walks the sharded parameters of tied weights and
    fails on an unevenly sharded vocabulary (the tiny model's 315 rows over 2 ranks); gather every parameter
    (a collective on all ranks) and save the full state dict from the main process instead."""
    if not self.is_fsdp_enabled:
        return _save_model(self, output_dir, _internal_call)
    from torch.distributed.tensor import DTensor

    out = output_dir or self.args.output_dir
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
             for k, v in self.model.state_dict().items()}
    if self.args.should_save:
        self.accelerator.unwrap_model(self.model).save_pretrained(out, state_dict=state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)


AcceleratorState.__init__ = _fsdp_on_cpu
_save_model = Trainer.save_model
Trainer.save_model = _save_full

if __name__ == "__main__":
    from fdpo.cli import main

    sys.argv[0] = "fdpo"
    main()
