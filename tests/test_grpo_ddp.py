"""FGRPOTrainer with 2 processes on the CPU (gloo) against 1 process at the same global batch.

What can legitimately differ: TRL 1.16 seeds each process with ``seed + process_index`` and samples its rows
from its own RNG stream, so the rollouts of a 2-process run are not those of a 1-process run. The runs here go
through tests/ddp_sampling.py, which makes only the categorical draw inside ``generate`` a function of
(generate call, global row, token) — rank-invariant — and leaves everything else as fdpo/TRL run it. With the
same rollouts, every number that data parallelism touches must agree: group advantages (rewards gathered over
processes), DAPO's global token normalisation, the GRPO divergence penalty, the DPH-RL rehearsal term (each
process gets its slice of the one rehearsal stream; the token mean is over all processes' tokens), DDP's
gradient average, and the metrics gathered for logging. Agreement is checked per step on the loss, the reward,
the completion lengths and every logged div/ and rehearsal/ metric.
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
RECIPES = REPO / "recipes" / "tiny" / "grpo"
STEPS = 3
GLOBAL_BATCH = 8  # 2 prompts × 4 rollouts per step; 2 processes: one prompt group each


def _train(world: int, recipe: Path, out: Path, overrides: dict, port: int) -> dict:
    args = [f"--{k}={v}" for k, v in overrides.items()]
    args += ["--output_dir", str(out), "--per_device_train_batch_size", str(GLOBAL_BATCH // world)]
    launch = [sys.executable, "-m", "tests.ddp_sampling"]
    if world == 2:
        launch = [sys.executable, "-m", "accelerate.commands.launch",
                  "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
                  "--main_process_port", str(port), "-m", "tests.ddp_sampling"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*launch, "train", str(recipe), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "fdpo_run_complete.json").read_text())
    assert info["world_size"] == world
    if world == 2:
        assert info["backend"] == "gloo"
    return {h["step"]: h for h in info["log_history"] if "loss" in h}


def _compare(logs: dict[int, dict], must: tuple[str, ...]) -> list[str]:
    assert sorted(logs[1]) == sorted(logs[2]) == list(range(1, STEPS + 1))
    keys = [k for k in logs[1][1]
            if k in ("loss", "reward", "completions/mean_length") or k.startswith(("div/", "rehearsal/"))]
    assert set(must) <= set(keys), keys
    for step in logs[1]:
        for key in keys:
            a, b = logs[1][step][key], logs[2][step][key]
            assert torch.isfinite(torch.tensor([a, b])).all(), (step, key, a, b)
            assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (step, key, logs[1][step], logs[2][step])
    return keys


def _common(tiny_sft_dir, data: Path) -> dict:
    return {
        "model_name_or_path": str(tiny_sft_dir), "dataset_name": str(data), "max_steps": STEPS, "num_generations": 4,
        "max_completion_length": 8, "logging_steps": 1, "save_strategy": "no", "eval_task": "null",
        "learning_rate": 1e-3,
    }


@pytest.mark.slow
def test_two_process_grpo_k3_ratio_matches_one_process(tiny_sft_dir, task_data_dir, tmp_path):
    over = {**_common(tiny_sft_dir, task_data_dir / "rl.jsonl"), "divergence_coef": 0.5}
    logs = {w: _train(w, RECIPES / "grpo_k3_ratio.yaml", tmp_path / f"w{w}", over, 29581) for w in (1, 2)}
    _compare(logs, ("loss", "reward", "div/reverse_kl"))
    # not vacuous: the policy moved off the reference, and the rollouts were not all alike
    assert logs[1][STEPS]["div/reverse_kl"] > 0
    assert 0 < logs[1][1]["reward"] < 1 or 0 < logs[1][2]["reward"] < 1


@pytest.mark.slow
def test_two_process_dph_rehearsal_matches_one_process(tiny_sft_dir, task_data_dir, tmp_path):
    from fdpo.data.rehearsal import RehearsalBuffer
    from fdpo.recipe import presample_recipe

    store = tmp_path / "dph"
    over = {**_common(tiny_sft_dir, task_data_dir / "rl.jsonl"), "rehearsal_file": str(store)}
    manifest = presample_recipe(
        RECIPES / "dph_js.yaml",
        {**over, "eval_task": None, "output_dir": str(tmp_path / "presample"), "presample_dir": str(store),
         "presample_n": 4, "num_generations": 4},
    )
    assert manifest["counts"]["stored_samples"] >= 4, manifest["counts"]

    # the rehearsal stream: 2 processes take disjoint slices whose union is the 1-process batch, step by step
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_sft_dir)
    one = RehearsalBuffer(store, tokenizer=tok, temperature=1.0, batch_size=4, seed=0)
    ranks = [RehearsalBuffer(store, tokenizer=tok, temperature=1.0, batch_size=2, seed=0, rank=r, world_size=2)
             for r in (0, 1)]
    for _ in range(3):
        whole = one.next_indices().tolist()
        parts = [b.next_indices().tolist() for b in ranks]
        assert parts[0] + parts[1] == whole and not set(parts[0]) & set(parts[1])

    # rehearsal batch: 4 stored samples per step in all (per process: 4 / world size)
    logs = {}
    for w in (1, 2):
        run = {**over, "rehearsal_batch_size": 4 // w, "rehearsal_coef": 1.0}
        logs[w] = _train(w, RECIPES / "dph_js.yaml", tmp_path / f"w{w}", run, 29583)
    _compare(logs, ("loss", "div/js", "rehearsal/loss", "rehearsal/logratio_abs_max", "rehearsal/tokens"))
    assert logs[1][STEPS]["div/js"] > 0  # the policy moved off the stored π_ref samples
