"""End-to-end SFT through fdpo's recipe → trainer path: learning, resume, and 2-process data parallel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdpo.recipe import load_recipe
from fdpo.train import run_training
from fdpo.trainers.checkpoints import MARKER, RUN_MARKER, checkpoint_dirs, last_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "tiny" / "sft" / "sft.yaml"


def _overrides(tiny_model_dir, task_data_dir, out, **extra):
    base = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(Path(task_data_dir) / "sft.jsonl"),
        "output_dir": str(out),
        "logging_steps": 1,
        "save_strategy": "no",
    }
    base.update(extra)
    return base


def _losses(metrics_or_history) -> dict[int, float]:
    history = metrics_or_history["log_history"] if isinstance(metrics_or_history, dict) else metrics_or_history
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_sft_raises_task_accuracy(tiny_model_dir, tiny_sft_dir):
    from fdpo.eval import evaluate_checkpoint

    out = tiny_sft_dir  # recipes/tiny/sft/sft.yaml trained through run_training (conftest)
    assert (out / RUN_MARKER).is_file() and (out / "config.json").is_file()
    kwargs = {"task": "sum_pairs", "ks": (1,), "num_samples": 4, "num_prompts": 32, "seed": 0}
    before = evaluate_checkpoint(str(tiny_model_dir), **kwargs)
    after = evaluate_checkpoint(str(out), **kwargs)
    # against the untrained model, not a magic number
    assert after["pass_at_k"]["1"] > before["pass_at_k"]["1"] + 0.3, (before["pass_at_k"], after["pass_at_k"])


def test_resume_equals_uninterrupted(tiny_model_dir, task_data_dir, tmp_path):
    common = {"max_steps": 6, "per_device_train_batch_size": 4, "warmup_steps": 0}
    full = run_training(
        load_recipe(SFT_RECIPE, _overrides(tiny_model_dir, task_data_dir, tmp_path / "full", **common))
    )
    out = tmp_path / "cut"
    cut = _overrides(tiny_model_dir, task_data_dir, out, save_strategy="steps", save_steps=3, **common)
    run_training(load_recipe(SFT_RECIPE, cut))
    # simulate a run killed after its step-3 checkpoint: later checkpoints and the final model vanish,
    # and a half-written checkpoint (no completion marker) is left behind
    for ckpt in checkpoint_dirs(out):
        if ckpt.name != "checkpoint-3":
            shutil.rmtree(ckpt)
    (out / RUN_MARKER).unlink()
    half = out / "checkpoint-5"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert last_complete_checkpoint(out).name == "checkpoint-3"
    resumed = run_training(load_recipe(SFT_RECIPE, cut), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    # the resumed run's history carries steps 1-3 over from the checkpoint's trainer state
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)
    assert not half.exists()  # moved aside, never loaded
    assert all((c / MARKER).is_file() for c in checkpoint_dirs(out))


@pytest.mark.slow
def test_two_process_cpu_matches_one_process(tiny_model_dir, task_data_dir, tmp_path):
    """accelerate launch with configs/accelerate/cpu_2proc.yaml: world size 2 (gloo), same loss as 1 process."""
    steps = 3
    one = run_training(
        load_recipe(
            SFT_RECIPE,
            _overrides(tiny_model_dir, task_data_dir, tmp_path / "one", max_steps=steps,
                       per_device_train_batch_size=8, warmup_steps=0),
        )
    )
    out2 = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", "29547",
        "-m", "fdpo", "train", str(SFT_RECIPE),
        "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(Path(task_data_dir) / "sft.jsonl"),
        "--output_dir", str(out2),
        "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--warmup_steps", "0",
        "--logging_steps", "1", "--save_strategy", "no",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out2 / RUN_MARKER).read_text())
    assert two["world_size"] == 2 and two["backend"] == "gloo"
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, steps + 1))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), (l1, l2)
