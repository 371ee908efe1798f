"""Run one validated recipe: load model and data, build the trainer, train, save.

The same function runs in one process (`fdpo train RECIPE`) and under `accelerate launch`
(`accelerate launch --config_file configs/accelerate/X.yaml -m fdpo train RECIPE`): accelerate
sets the environment, transformers' Trainer picks it up. fdpo adds no process management.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from fdpo.cpu_threads import torch_threads
from fdpo.data.loading import check_columns, load_any_dataset
from fdpo.errors import RecipeError
from fdpo.recipe import Recipe
from fdpo.trainers.checkpoints import (
    RESOLVED_RECIPE,
    RUN_MARKER,
    CompleteCheckpointCallback,
    last_complete_checkpoint,
    write_json,
)
from fdpo.trainers.guards import NonFiniteGradientCallback
from fdpo.trainers.registry import get_trainer_spec
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


def load_model_and_tokenizer(recipe: Recipe):
    """`from_pretrained` on `model_name_or_path`: the same path for the tiny model and a hub model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    margs = recipe.model_args
    name = margs.model_name_or_path
    kwargs: dict[str, Any] = {"revision": margs.model_revision}
    if margs.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, margs.dtype)
    elif margs.dtype == "auto":
        kwargs["dtype"] = "auto"
    if margs.attn_implementation is not None:
        kwargs["attn_implementation"] = margs.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=margs.model_revision)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise RecipeError(
            f"{recipe.path}: key 'model_name_or_path' = {name!r} could not be loaded ({str(exc)[:300]}). "
            "Use a local model directory (e.g. build the tiny one with `fdpo tiny runs/tiny/model`) or, with "
            "network access, a hub name."
        ) from exc
    return model, tokenizer


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


def run_training(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train `recipe` to completion; returns the final metrics. Resumes from the last complete checkpoint.

    On a CPU, `cpu_threads` (recipe key) sets torch's intra-op threads for the run and restores them after.
    The dependencies' warnings that fdpo cannot prevent are filtered, narrowly, for the run
    (`fdpo.warning_filters`).
    """
    threads = recipe.recipe_args.cpu_threads
    if threads is not None and threads < 1:
        raise RecipeError(f"{recipe.path}: key 'cpu_threads' must be ≥ 1 (or null for torch's default), got {threads}.")
    with torch_threads(threads), unpreventable_warnings_filtered():
        return _run_training(recipe, resume=resume)


def _run_training(recipe: Recipe, *, resume: bool) -> dict[str, Any]:
    from transformers import set_seed
    from trl import get_peft_config

    spec = get_trainer_spec(recipe.recipe_args.trainer)
    targs = recipe.training_args
    set_seed(targs.seed)
    train_ds, eval_ds = load_datasets(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe)
    text = resolved_recipe_text(recipe)
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
    is_main = trainer.accelerator.is_main_process
    checkpoint = None
    if resume or targs.resume_from_checkpoint not in (None, False, "false"):
        if isinstance(targs.resume_from_checkpoint, str) and targs.resume_from_checkpoint not in ("true", "True"):
            checkpoint = targs.resume_from_checkpoint
        else:
            found = last_complete_checkpoint(out_dir, quarantine=is_main)
            checkpoint = str(found) if found else None
            if checkpoint is None:
                logger.warning("resume asked for, but %s has no complete checkpoint: starting fresh", out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESOLVED_RECIPE).write_text(text)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out_dir))
    metrics = dict(result.metrics)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    metrics["global_step"] = trainer.state.global_step
    metrics["resumed_from"] = checkpoint
    metrics["world_size"] = trainer.accelerator.num_processes
    metrics["distributed_type"] = str(trainer.accelerator.distributed_type.value)
    metrics["backend"] = trainer.accelerator.state.backend
    metrics["log_history"] = trainer.state.log_history
    if is_main:
        write_json(out_dir / RUN_MARKER, metrics)
    return metrics
