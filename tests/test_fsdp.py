"""FSDP2 with 2 processes on the CPU (gloo) against 1 unsharded process on the same global batch.

Launched as users launch it: `accelerate launch --config_file configs/accelerate/fsdp.yaml` (2 processes,
fp32 here: `--mixed_precision no`), through `tests/fsdp_cpu.py`, which restores the one decision accelerate
makes differently on a CPU (it drops the FSDP plugin there); everything else is accelerate's FSDP2
preparation (`fully_shard` per decoder layer, then the root, `reshard_after_forward: true`) and fdpo's code.

For f-SFT with γ > 0 (its LM head is read outside the head's own forward) and for plain SFT: the per-step losses and
the trained weights equal the 1-process run's (float tolerance), and the weights moved (so the
comparison is not vacuous). The tiny model ties its embedding and LM head, so the head's gradient
combines the embedding's (inside the forward) with the divergence's (through `model_access.in_forward`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "tiny"
GLOBAL_BATCH = 8
STEPS = 3


def _train(world: int, recipe: Path, args: list[str], out: Path, port: int) -> dict:
    args = [*args, "--output_dir", str(out), "--max_steps", str(STEPS), "--warmup_steps", "0",
            "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
            "--per_device_train_batch_size", str(GLOBAL_BATCH // world)]
    if world == 1:
        launch = [sys.executable, "-m", "tests.ddp_sampling"]  # fdpo's CLI; rank-invariant GRPO rollouts
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                  "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
                  str(REPO / "tests" / "fsdp_cpu.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*launch, "train", str(recipe), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = json.loads((out / "fdpo_run_complete.json").read_text())
    assert info["world_size"] == world
    if world == 2:
        assert info["distributed_type"] == "FSDP", info["distributed_type"]
    return info


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _compare(tmp_path: Path, recipe: Path, args: list[str], port: int, keys: tuple[str, ...], start: Path):
    runs = {w: _train(w, recipe, args, tmp_path / f"w{w}", port) for w in (1, 2)}
    logs = {w: {h["step"]: h for h in info["log_history"] if "loss" in h} for w, info in runs.items()}
    assert sorted(logs[1]) == sorted(logs[2]) == list(range(1, STEPS + 1))
    compared = [k for k in logs[1][1] if k == "loss" or k.startswith(keys)]
    assert "loss" in compared, compared
    for step in logs[1]:
        for key in compared:
            assert logs[2][step][key] == pytest.approx(logs[1][step][key], rel=1e-4, abs=1e-6), (step, key)
    one, two, before = _weights(tmp_path / "w1"), _weights(tmp_path / "w2"), _weights(start)
    assert set(one) <= set(two)  # the FSDP save also writes the tied lm_head.weight
    moved = max((one[k] - before[k]).abs().max().item() for k in one if k in before)
    assert moved > 1e-4, moved
    for k in one:
        diff = (two[k] - one[k]).abs().max().item()
        assert diff < 1e-5 + 1e-4 * one[k].abs().max().item(), (k, diff)
    return compared


pytestmark = pytest.mark.slow


def test_fsdp_fsft_gamma(tiny_model_dir, task_data_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(task_data_dir / "sft.jsonl"),
            "--divergence", "js", "--divergence_coef", "5.0", "--learning_rate", "0.1", "--optim", "sgd"]
    # `loss` is TRL's global token mean; `grad_norm` at step 2 includes the divergence's gradient (0 at step 1,
    # π = π_ref); the logged div/nll are per-rank token means averaged over ranks, so they are not compared
    compared = _compare(tmp_path, RECIPES / "sft" / "sft.yaml", args, 29641, ("grad_norm",), tiny_model_dir)
    assert "grad_norm" in compared, compared


def test_fsdp_plain_sft(tiny_model_dir, task_data_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(task_data_dir / "sft.jsonl"),
            "--learning_rate", "1e-2"]
    _compare(tmp_path, RECIPES / "sft" / "sft.yaml", args, 29642, ("grad_norm",), tiny_model_dir)


def test_fsdp_grpo_full_vocab_is_refused_clearly(tiny_sft_dir, task_data_dir, tmp_path):
    """Not lifted yet: inside the redirected forward the GRPO loss still sees a DTensor head (under
    investigation), so FGRPOTrainer refuses `estimator: full_vocab` under FSDP with the key named."""
    args = ["--model_name_or_path", str(tiny_sft_dir), "--dataset_name", str(task_data_dir / "rl.jsonl"),
            "--num_generations", "4", "--max_completion_length", "8", "--eval_task", "null",
            "--divergence_coef", "0.5", "--output_dir", str(tmp_path / "grpo"), "--max_steps", "1",
            "--per_device_train_batch_size", "4"]
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29645",
              str(REPO / "tests" / "fsdp_cpu.py"), "train", str(RECIPES / "grpo" / "grpo_full_vocab.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "key 'estimator' = 'full_vocab' is not supported under FSDP" in proc.stdout + proc.stderr
