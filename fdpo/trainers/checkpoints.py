"""Checkpoints that are complete or absent.

transformers writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG, trainer
state); a run killed in between leaves a folder that looks like a checkpoint but is not. fdpo marks
a checkpoint complete only after every piece is written (`CompleteCheckpointCallback.on_save`), and
resumes from the newest marked one; unmarked folders are moved aside, never loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

MARKER = "fdpo_checkpoint_complete.json"
RUN_MARKER = "fdpo_run_complete.json"
RESOLVED_RECIPE = "fdpo_recipe.resolved.yaml"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger("fdpo")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """All `checkpoint-N` folders in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path, *, quarantine: bool = False) -> Path | None:
    """The newest checkpoint carrying the completion marker; with `quarantine`, move incomplete ones aside."""
    complete = None
    for ckpt in checkpoint_dirs(output_dir):
        if is_complete(ckpt):
            complete = ckpt
        elif quarantine:
            target = ckpt.with_name(f"incomplete-{ckpt.name}-{int(time.time())}")
            logger.warning("checkpoint %s is incomplete (killed while saving?); moved to %s", ckpt, target)
            shutil.move(str(ckpt), str(target))
    return complete


def run_is_complete(output_dir: str | Path) -> bool:
    """True when a training run finished and saved its final model in `output_dir`."""
    return (Path(output_dir) / RUN_MARKER).is_file()


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + rename): readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once transformers has written all of it; copies the recipe in."""

    def __init__(self, resolved_recipe_text: str | None = None) -> None:
        self.resolved_recipe_text = resolved_recipe_text

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        if self.resolved_recipe_text is not None:
            (ckpt / RESOLVED_RECIPE).write_text(self.resolved_recipe_text)
        write_json(ckpt / MARKER, {"global_step": state.global_step, "time": time.time()})
