"""Run one validated recipe: load model and data, build the trainer, train, save.

The same function runs in one process (`fdpo train RECIPE`) and under `accelerate launch`
(`accelerate launch --config_file configs/accelerate/X.yaml -m fdpo train RECIPE`): accelerate
sets the environment, transformers' Trainer picks it up. fdpo adds no process management.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from fdpo.cpu_threads import torch_threads
from fdpo.data.loading import check_columns, load_any_dataset
from fdpo.errors import RecipeError, RunDirError
from fdpo.models.checks import check_model_dir
from fdpo.recipe import Recipe
from fdpo.trainers.checkpoints import (
    RESOLVED_RECIPE,
    RUN_MARKER,
    CompleteCheckpointCallback,
    checkpoint_dirs,
    is_complete,
    last_complete_checkpoint,
    write_json,
)
from fdpo.trainers.guards import NonFiniteGradientCallback
from fdpo.trainers.registry import get_trainer_spec
from fdpo.trainers.run_dir import RunPlan, plan_run, record_resume_changes, run_dir_lock
from fdpo.warning_filters import unpreventable_warnings_filtered

logger = logging.getLogger("fdpo")


def load_datasets(recipe: Recipe):
    """Train (and optional eval) datasets of `recipe`, with their columns checked."""
    spec = get_trainer_spec(recipe.recipe_args.trainer)
    args = recipe.recipe_args
    out = []
    for key, name, split in (
        ("dataset_name", args.dataset_name, args.dataset_train_split),
        ("eval_dataset_name", args.eval_dataset_name, args.dataset_test_split),
    ):
        if name is None:
            out.append(None)
            continue
        ds = load_any_dataset(name, config=args.dataset_config, split=split, key=f"{recipe.path}: {key}")
        required = spec.required_columns(ds.column_names)
        check_columns(
            ds,
            required,
            source=f"{name} (recipe key '{key}' in {recipe.path})",
            text_columns=[c for c in required if c in spec.text_columns],
        )
        out.append(ds)
    return out[0], out[1]


def is_conversational(dataset) -> bool:
    """True when the first row holds chat messages (lists of {role, content}) rather than strings."""
    row = dataset[0]
    return any(isinstance(v, list) and v and isinstance(v[0], dict) and "role" in v[0] for v in row.values())


def load_model_and_tokenizer(recipe: Recipe, *, conversational: bool = False):
    """`from_pretrained` on `model_name_or_path`: the same path for the tiny model and a hub model.

    `trust_remote_code` (recipe key, off by default) is passed to both the model and the tokenizer. With
    `conversational` data the tokenizer must carry a chat template (checked before the model loads).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    margs = recipe.model_args
    name = margs.model_name_or_path
    where = f"{recipe.path}: key 'model_name_or_path' = {name!r}"
    check_model_dir(name, where=where)
    # TRL 1.x keeps `trust_remote_code` on the trainer config (older TRL: on ModelConfig)
    trust = bool(getattr(recipe.training_args, "trust_remote_code", getattr(margs, "trust_remote_code", False)))
    common: dict[str, Any] = {"revision": margs.model_revision, "trust_remote_code": trust}
    kwargs: dict[str, Any] = dict(common)
    if margs.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, margs.dtype)
    elif margs.dtype == "auto":
        kwargs["dtype"] = "auto"
    if margs.attn_implementation is not None:
        kwargs["attn_implementation"] = margs.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
        no_template = getattr(tokenizer, "chat_template", None) is None
        if conversational and no_template and getattr(recipe.training_args, "chat_template_path", None) is None:
            raise RecipeError(
                f"{where}: the tokenizer has no chat template, but the data holds chat messages. Add one "
                "(`chat_template` in tokenizer_config.json, or the recipe key `chat_template_path`), or give the "
                "data as prompt/completion strings."
            )
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        if isinstance(exc, RecipeError):
            raise
        raise RecipeError(
            f"{where} could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). "
            "Use a local model directory (e.g. build the tiny one with `fdpo tiny runs/tiny/model`) or, with "
            "network access, a hub name."
        ) from exc
    return model, tokenizer


def check_rows_left(trainer, train_ds, recipe: Recipe) -> None:
    """Log how many training rows the trainer dropped for length; refuse a run with none left."""
    kept = getattr(trainer, "train_dataset", None)
    if kept is None or not hasattr(kept, "__len__") or getattr(recipe.training_args, "packing", False):
        return
    dropped = len(train_ds) - len(kept)
    max_length = getattr(recipe.training_args, "max_length", None)
    source = f"{recipe.recipe_args.dataset_name} (recipe key 'dataset_name' in {recipe.path})"
    if len(kept) == 0:
        raise RecipeError(
            f"{source}: every one of its {len(train_ds)} rows is too long for max_length={max_length} after "
            "tokenization, so nothing is left to train on. Raise max_length (recipe key) or shorten the rows."
        )
    if dropped > 0:
        logger.warning(
            "%s: dropped %d of %d rows too long for max_length=%s (nothing left to learn after truncation)",
            source, dropped, len(train_ds), max_length,
        )


def resolved_recipe_text(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=True)


def use_cpu_backend_if_no_gpu() -> None:
    """Under `accelerate launch` with several processes and no GPU, make accelerate use gloo on the CPU.

    accelerate's own MULTI_CPU mode spawns a single process unless mpirun is used; fdpo's
    `configs/accelerate/cpu_2proc.yaml` therefore launches with torchrun (MULTI_GPU launcher) and
    this switch tells every process to initialise the gloo backend on the CPU.
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def end_distributed() -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can abort a rank after training has finished
    ('terminate called without an active exception', SIGABRT), failing an otherwise complete run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _is_main_rank() -> bool:
    """Rank 0 of an `accelerate launch` (or the only process): the one that locks and writes the run directory."""
    return int(os.environ.get("RANK", "0")) == 0


def run_training(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train `recipe` to completion; returns the final metrics. Resumes from the last complete checkpoint.

    The run directory is locked for the run and checked before anything loads (`fdpo.trainers.run_dir`):
    another run's files are refused unless `overwrite`; `resume` continues only the same run, and a
    finished run resumed returns its metrics with `already_complete: True`, writing nothing.
    On a CPU, `cpu_threads` (recipe key) sets torch's intra-op threads for the run and restores them after.
    The dependencies' warnings that fdpo cannot prevent are filtered, narrowly, for the run
    (`fdpo.warning_filters`).
    """
    threads = recipe.recipe_args.cpu_threads
    if threads is not None and threads < 1:
        raise RecipeError(f"{recipe.path}: key 'cpu_threads' must be ≥ 1 (or null for torch's default), got {threads}.")
    out_dir = Path(recipe.training_args.output_dir)
    text = resolved_recipe_text(recipe)
    is_main = _is_main_rank()
    with run_dir_lock(out_dir, enabled=is_main):
        plan = plan_run(out_dir, yaml.safe_load(text), resume=resume, overwrite=overwrite,
                        explicit=recipe.training_args.resume_from_checkpoint, is_main=is_main)
        if plan.already_complete:
            logger.info("%s: the run is already complete (step %s); nothing to do", out_dir,
                        plan.previous_metrics.get("global_step"))
            return {**plan.previous_metrics, "already_complete": True}
        if is_main and plan.checkpoint is not None:
            (out_dir / RUN_MARKER).unlink(missing_ok=True)  # a run extended past its end is incomplete until it ends
        with torch_threads(threads), unpreventable_warnings_filtered():
            return _run_training(recipe, text, plan)


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_error(exc: BaseException, out_dir: Path, is_main: bool) -> RunDirError:
    """ENOSPC while saving: name the path, delete the partial checkpoint, keep the last complete one."""
    filename = next((e.filename for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError)
                     and e.filename), None)
    last = last_complete_checkpoint(out_dir)
    partial = [c for c in checkpoint_dirs(out_dir) if not is_complete(c)]
    note = ""
    if partial and is_main:
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        note = f" The partial {', '.join(p.name for p in partial)} was deleted to free space."
    kept = f"the last complete checkpoint {last} is intact" if last else "no complete checkpoint had been written yet"
    return RunDirError(
        f"no space left on device while writing {filename or (partial[0] if partial else out_dir)}; {kept}.{note} "
        f"Free space on the disk holding {out_dir} (or lower save_total_limit), then rerun with --resume."
    )


def _run_training(recipe: Recipe, text: str, plan: RunPlan) -> dict[str, Any]:
    from transformers import set_seed
    from trl import get_peft_config

    spec = get_trainer_spec(recipe.recipe_args.trainer)
    targs = recipe.training_args
    set_seed(targs.seed)
    train_ds, eval_ds = load_datasets(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe, conversational=is_conversational(train_ds))
    out_dir = Path(targs.output_dir)
    trainer = spec.trainer_class()(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(recipe.model_args),
        callbacks=[CompleteCheckpointCallback(text), NonFiniteGradientCallback()],
    )
    check_rows_left(trainer, train_ds, recipe)
    is_main = trainer.accelerator.is_main_process
    checkpoint = plan.checkpoint
    start = time.time()
    try:
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / RESOLVED_RECIPE).write_text(text)
            if checkpoint is not None:
                record_resume_changes(out_dir, checkpoint, plan.changes)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(str(out_dir))
    except (OSError, RuntimeError) as exc:
        if _disk_full(exc):
            raise _disk_full_error(exc, out_dir, is_main) from exc
        raise
    metrics = dict(result.metrics)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    metrics["global_step"] = trainer.state.global_step
    metrics["resumed_from"] = checkpoint
    metrics["resume_changes"] = {k: list(v) for k, v in plan.changes.items()} if checkpoint else {}
    metrics["world_size"] = trainer.accelerator.num_processes
    metrics["distributed_type"] = str(trainer.accelerator.distributed_type.value)
    metrics["backend"] = trainer.accelerator.state.backend
    metrics["log_history"] = trainer.state.log_history
    if is_main:
        try:
            write_json(out_dir / RUN_MARKER, metrics)
        except OSError as exc:
            if _disk_full(exc):
                raise _disk_full_error(exc, out_dir, is_main) from exc
            raise
    return metrics
