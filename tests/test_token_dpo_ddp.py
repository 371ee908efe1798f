"""TokenDPOTrainer (SparsePO, learned common mask) with 2 processes on the CPU (gloo) against 1 process at the
same global batch: the per-step losses and logged metrics agree, and so do the learned mask parameters.

The mask networks live beside the model, outside DDP, so their gradients are averaged over processes by hand
(``TokenDPOTrainer.training_step``); without that averaging rank 0 would step its masks on its half of the
batch only and the saved masks (written by rank 0) would differ from the one-process run. DPO draws no
samples, so both runs see the same global batch and the numbers agree up to the float reduction order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "token_dpo" / "sparsepo_common.yaml"
MASK_FILE = "fdpo_token_mask.safetensors"
STEPS = 3
GLOBAL_BATCH = 8


def _run(world: int, tiny_model_dir: Path, task_data_dir: Path, out: Path) -> dict:
    args = [
        "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(Path(task_data_dir) / "preference.jsonl"),
        "--eval_dataset_name", str(Path(task_data_dir) / "preference_eval.jsonl"),
        "--eval_strategy", "no",
        "--output_dir", str(out),
        "--max_steps", str(STEPS), "--warmup_steps", "0", "--logging_steps", "1",
        "--per_device_train_batch_size", str(GLOBAL_BATCH // world),
        "--learning_rate", "1e-3", "--mask_learning_rate", "5e-2",  # both the policy and the masks move
        "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", str(STEPS),
    ]
    launch = [sys.executable, "-m", "fdpo"]
    if world == 2:
        launch = [sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
                  "--main_process_port", "29573", "-m", "fdpo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*launch, "train", str(RECIPE), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "fdpo_run_complete.json").read_text())
    assert info["world_size"] == world
    if world == 2:
        assert info["backend"] == "gloo"
    return info


def _masks(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / MASK_FILE))


@pytest.mark.slow
def test_two_process_sparsepo_matches_one_process(tiny_model_dir, task_data_dir, tmp_path):
    runs = {w: _run(w, tiny_model_dir, task_data_dir, tmp_path / f"w{w}") for w in (1, 2)}
    logs = {w: {h["step"]: h for h in info["log_history"] if "loss" in h} for w, info in runs.items()}
    assert sorted(logs[1]) == sorted(logs[2]) == list(range(1, STEPS + 1))
    compared = [k for k in logs[1][1] if k == "loss" or k.startswith(("div/", "mask/", "rewards/", "logps/"))]
    assert "loss" in compared and any(k.startswith("mask/") for k in compared) and any(
        k.startswith("div/") for k in compared), compared
    for step in logs[1]:
        for key in compared:
            assert logs[2][step][key] == pytest.approx(logs[1][step][key], rel=1e-4, abs=1e-6), (step, key)

    # the masks after step 1 and at the end: equal across world sizes, and they did move (not vacuous)
    first = {w: _masks(tmp_path / f"w{w}" / "checkpoint-1") for w in (1, 2)}
    final = {w: _masks(tmp_path / f"w{w}") for w in (1, 2)}
    assert set(final[1]) == set(final[2]) and final[1]
    moved = max((final[1][k] - first[1][k]).abs().max().item() for k in final[1])
    assert moved > 1e-2, moved
    for masks in (first, final):
        for k in masks[1]:
            diff = (masks[2][k] - masks[1][k]).abs().max().item()
            assert diff < 1e-4 * max(1.0, masks[1][k].abs().max().item()), (k, diff)
