"""Checkpoints that are complete or absent.

transformers writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG, trainer
state); a run killed in between leaves a folder that looks like a checkpoint but is not. fdpo marks
a checkpoint complete only after every piece is written (`CompleteCheckpointCallback.on_save`), and
resumes from the newest marked one; unmarked folders are moved aside (at most one kept), never loaded.

Rotation (`save_total_limit`) is fdpo's, not transformers': transformers deletes old checkpoints
before any callback runs, so a kill between its save and fdpo's marker would leave no complete
checkpoint. The callback takes the limit over at train start and rotates only after marking the
new checkpoint, so at every instant at least one complete checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

MARKER = "fdpo_checkpoint_complete.json"
RUN_MARKER = "fdpo_run_complete.json"
RESOLVED_RECIPE = "fdpo_recipe.resolved.yaml"
QUARANTINE_PREFIX = "incomplete-"
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
            target = ckpt.with_name(f"{QUARANTINE_PREFIX}{ckpt.name}-{time.time_ns()}")
            logger.warning("checkpoint %s is incomplete (killed while saving?); moved to %s", ckpt, target)
            shutil.move(str(ckpt), str(target))
            prune_quarantined(output_dir, keep=target)
    return complete


def quarantined_dirs(output_dir: str | Path) -> list[Path]:
    """The `incomplete-checkpoint-*` folders moved aside in `output_dir`."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(QUARANTINE_PREFIX + "checkpoint-"))


def prune_quarantined(output_dir: str | Path, *, keep: Path | None = None) -> None:
    """Delete every quarantined folder but `keep`: one is enough to inspect, more would fill the disk."""
    for old in quarantined_dirs(output_dir):
        if keep is None or old != keep:
            logger.info("deleting the older quarantined folder %s", old)
            shutil.rmtree(old, ignore_errors=True)


def run_is_complete(output_dir: str | Path) -> bool:
    """True when a training run finished and saved its final model in `output_dir`."""
    return (Path(output_dir) / RUN_MARKER).is_file()


def write_json(path: Path, payload: dict | list) -> None:
    """Write JSON atomically (temp file + rename): readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once transformers has written all of it, copies the recipe in, and
    only then deletes checkpoints beyond `save_total_limit` (the limit is taken over from transformers)."""

    def __init__(self, resolved_recipe_text: str | None = None) -> None:
        self.resolved_recipe_text = resolved_recipe_text
        self.save_total_limit: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.save_total_limit, args.save_total_limit = args.save_total_limit, None

    def on_train_end(self, args, state, control, **kwargs):
        args.save_total_limit = self.save_total_limit

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        if self.resolved_recipe_text is not None:
            (ckpt / RESOLVED_RECIPE).write_text(self.resolved_recipe_text)
        write_json(ckpt / MARKER, {"global_step": state.global_step, "time": time.time()})
        rotate_checkpoints(
            output_dir=args.output_dir,
            save_total_limit=self.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=False,
        )
