"""What a run directory allows: one run at a time, never two runs mixed, resume only of the same run.

A run directory (`output_dir`) holds ONE run: its resolved recipe (`fdpo_recipe.resolved.yaml`), its
checkpoints (each with the recipe it was written under) and, once finished, the final model and
`fdpo_run_complete.json`. Before anything loads, `plan_run` compares what the directory holds with
the recipe about to run:

- a fresh run (no `--resume`) needs an empty or absent directory; anything else is refused, naming
  the directory and the keys that differ, unless `--overwrite` (which empties it first);
- `--resume` (or `resume_from_checkpoint`) continues only the same run: a changed objective,
  divergence, model, data or any other key outside `SAFE_ON_RESUME` is refused; a safe change is
  recorded (`fdpo_resume_changes.json`: which keys, old → new, at which step);
- a finished run resumed is "already complete": nothing is trained or written.

`run_dir_lock` takes a `filelock` on the directory for the whole run; a second run gets an error
naming the holder (pid, host, command, start time).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fdpo.data.rehearsal import DEFAULT_SUBDIR as REHEARSAL_SUBDIR
from fdpo.errors import RunDirError
from fdpo.trainers.checkpoints import (
    QUARANTINE_PREFIX,
    RESOLVED_RECIPE,
    RUN_MARKER,
    checkpoint_dirs,
    is_complete,
    last_complete_checkpoint,
    quarantined_dirs,
    write_json,
)

logger = logging.getLogger("fdpo")

LOCK_FILE = ".fdpo.lock"
HOLDER_FILE = ".fdpo.lock.holder.json"
RESUME_CHANGES = "fdpo_resume_changes.json"
# keys that change how a run is watched, saved or scheduled on this machine, not what it optimises
SAFE_ON_RESUME = frozenset({
    "fdpo_recipe", "output_dir", "resume_from_checkpoint", "local_rank", "cpu_threads",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "report_to", "run_name", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "disable_tqdm", "skip_memory_metrics",
    "save_steps", "save_strategy", "save_total_limit", "save_on_each_node", "save_only_model",
    "eval_steps", "eval_strategy", "eval_delay", "eval_on_start", "eval_task", "per_device_eval_batch_size",
    "eval_accumulation_steps", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "ddp_timeout", "torch_empty_cache_steps",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
    "hub_revision",
})
UPWARD_ON_RESUME = frozenset({"max_steps", "num_train_epochs"})  # may grow, never shrink
_OWN_FILES = {LOCK_FILE, HOLDER_FILE}


def _holder_text(out_dir: Path) -> str:
    try:
        info = json.loads((out_dir / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return "another process (its details could not be read)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {since} (`{info.get('command')}`)"


@contextmanager
def run_dir_lock(out_dir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `out_dir` (created if absent); `enabled=False` (non-main ranks) is a no-op."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(
            f"output_dir {out_dir} is in use by another fdpo run: {_holder_text(out_dir)}. Wait for it to finish, "
            "stop it, or choose another output_dir."
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}
    try:
        write_json(out_dir / HOLDER_FILE, holder)
        yield
    finally:
        (out_dir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def recipe_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two resolved recipes (keys only one side knows are skipped:
    a field added or removed by another fdpo version is no change of the run)."""
    return {k: (saved[k], new[k]) for k in sorted(saved.keys() & new.keys()) if saved[k] != new[k]}


def _fmt_diffs(diffs: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    shown = [f"{k}: {old!r} → {new!r}" for k, (old, new) in list(diffs.items())[:limit]]
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(shown) + more


def unsafe_differences(diffs: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The differences a resume must refuse: anything outside `SAFE_ON_RESUME`, or an `UPWARD_ON_RESUME`
    key lowered (-1, "use epochs", counts as lowest)."""
    out = {}
    for key, (old, new) in diffs.items():
        if key in SAFE_ON_RESUME:
            continue
        if key in UPWARD_ON_RESUME and isinstance(old, int | float) and isinstance(new, int | float) and new >= old:
            continue
        out[key] = (old, new)
    return out


def read_resolved(folder: Path) -> dict[str, Any] | None:
    path = folder / RESOLVED_RECIPE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _contents(out_dir: Path) -> list[Path]:
    """What `out_dir` holds besides fdpo's own lock files and the DPH-RL store that `fdpo presample`
    writes there by default (`<output_dir>/dph`, made before the run it feeds)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.name not in _OWN_FILES
                  and not (p.name == REHEARSAL_SUBDIR and p.is_dir()))


def clear_run_dir(out_dir: Path) -> None:
    """`--overwrite`: delete everything in `out_dir` but the lock."""
    for item in _contents(out_dir):
        logger.info("--overwrite: deleting %s", item)
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


@dataclass
class RunPlan:
    """What `plan_run` decided: start fresh, resume from `checkpoint`, or nothing to do."""

    checkpoint: str | None = None
    already_complete: bool = False
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    previous_metrics: dict[str, Any] = field(default_factory=dict)


def _explicit_checkpoint(value: Any) -> str | None:
    if isinstance(value, str) and value not in ("", "true", "True", "false", "False"):
        return value
    return None


def check_explicit_checkpoint(path_text: str) -> Path:
    """`resume_from_checkpoint: PATH` must name a complete checkpoint (the same check as `--resume`)."""
    path = Path(path_text).expanduser()
    key = f"key 'resume_from_checkpoint' = {path_text!r}"
    if not path.is_dir():
        raise RunDirError(f"{key}: {path} is not a directory. Name a checkpoint-N folder of a run.")
    if path.name.startswith(QUARANTINE_PREFIX):
        raise RunDirError(
            f"{key}: {path} is an incomplete checkpoint fdpo moved aside (the run was killed while saving it); "
            "it cannot be resumed. Name a complete checkpoint-N folder, or use --resume to pick the newest one."
        )
    if not is_complete(path):
        raise RunDirError(
            f"{key}: {path} is not a complete checkpoint (it has no {path.name}/fdpo_checkpoint_complete.json: "
            "killed while saving, or not written by fdpo). Name a complete checkpoint-N folder, or use --resume."
        )
    return path


def _extends(saved: dict[str, Any] | None, resolved: dict[str, Any]) -> bool:
    """A complete run resumed with `max_steps`/`num_train_epochs` raised (and nothing unsafe changed)
    continues from its last checkpoint instead of being "already complete"."""
    if saved is None:
        return False
    diffs = recipe_differences(saved, resolved)
    if unsafe_differences(diffs):
        return False
    return any(key in UPWARD_ON_RESUME and isinstance(old, int | float) and isinstance(new, int | float)
               and new > old for key, (old, new) in diffs.items())


def _refuse_changed(where: str, unsafe: dict[str, tuple[Any, Any]]) -> None:
    raise RunDirError(
        f"{where} was written by a different recipe: {_fmt_diffs(unsafe)}. Resuming would continue that run under "
        "other settings. Undo those changes to resume it, or start a new run in another output_dir (or pass "
        f"--overwrite to discard it). Safe to change on resume: max_steps/num_train_epochs (upward), "
        "logging, saving, evaluation cadence and reporting keys."
    )


def plan_run(out_dir: Path, resolved: dict[str, Any], *, resume: bool, overwrite: bool, explicit: Any,
             is_main: bool = True) -> RunPlan:
    """Decide how a run may use `out_dir` (see the module docstring); raises `RunDirError` if it may not."""
    explicit_ckpt = _explicit_checkpoint(explicit)
    resume = resume or explicit_ckpt is not None or explicit in (True, "true", "True")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one (overwrite deletes the run).")
    if overwrite:
        if is_main:
            clear_run_dir(out_dir)
        return RunPlan()
    saved = read_resolved(out_dir)
    if not resume:
        if not _contents(out_dir):
            return RunPlan()
        if saved is None:
            names = ", ".join(p.name for p in _contents(out_dir)[:5])
            raise RunDirError(
                f"output_dir {out_dir} is not empty ({names}) and holds no fdpo run. Choose a new or empty "
                "output_dir, or pass --overwrite to delete its contents."
            )
        unsafe = unsafe_differences(recipe_differences(saved, resolved))
        state = "a complete run" if (out_dir / RUN_MARKER).is_file() else "a run"
        if unsafe:
            raise RunDirError(
                f"output_dir {out_dir} holds {state} of another recipe (differing keys: {_fmt_diffs(unsafe)}). "
                "Choose another output_dir, or pass --overwrite to delete that run."
            )
        raise RunDirError(
            f"output_dir {out_dir} already holds {state} of this recipe. Pass --resume to continue it (a complete "
            "run stays as it is), or --overwrite to start it over."
        )
    if (out_dir / RUN_MARKER).is_file() and explicit_ckpt is None and not _extends(saved, resolved):
        if saved is not None and (unsafe := unsafe_differences(recipe_differences(saved, resolved))):
            _refuse_changed(f"the complete run in {out_dir}", unsafe)
        try:
            previous = json.loads((out_dir / RUN_MARKER).read_text())
        except (OSError, ValueError):
            previous = {}
        return RunPlan(already_complete=True, previous_metrics=previous)
    if explicit_ckpt is not None:
        ckpt = check_explicit_checkpoint(explicit_ckpt)
    else:
        ckpt = last_complete_checkpoint(out_dir, quarantine=is_main)
    if ckpt is None:
        if saved is not None and (unsafe := unsafe_differences(recipe_differences(saved, resolved))):
            _refuse_changed(f"output_dir {out_dir}", unsafe)
        foreign = [p.name for p in _contents(out_dir) if not p.name.startswith(("checkpoint-", QUARANTINE_PREFIX))]
        if saved is None and foreign:
            raise RunDirError(
                f"output_dir {out_dir} is not empty ({', '.join(foreign[:5])}) and holds no fdpo run to resume. "
                "Choose a new or empty output_dir, or pass --overwrite to delete its contents."
            )
        if checkpoint_dirs(out_dir) or saved is not None or quarantined_dirs(out_dir):
            logger.warning("resume asked for, but %s has no complete checkpoint: starting fresh", out_dir)
        return RunPlan()
    ckpt_recipe = read_resolved(ckpt) or saved
    diffs = recipe_differences(ckpt_recipe, resolved) if ckpt_recipe is not None else {}
    if unsafe := unsafe_differences(diffs):
        _refuse_changed(f"checkpoint {ckpt}", unsafe)
    changes = {k: v for k, v in diffs.items() if k not in ("fdpo_recipe", "output_dir", "resume_from_checkpoint",
                                                            "local_rank")}
    return RunPlan(checkpoint=str(ckpt), changes=changes)


def record_resume_changes(out_dir: Path, checkpoint: str, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the keys changed on this resume, and the step it resumed at, to `fdpo_resume_changes.json`."""
    if not changes:
        return
    path = out_dir / RESUME_CHANGES
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        history = []
    step = int(Path(checkpoint).name.rsplit("-", 1)[-1]) if Path(checkpoint).name.startswith("checkpoint-") else None
    history.append({"resumed_at_step": step, "checkpoint": checkpoint, "time": time.time(),
                    "changed": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}})
    write_json(path, history)  # a list, one entry per resume
    logger.info("resumed at step %s with changed keys: %s", step, _fmt_diffs(changes))
