"""`fdpo sweep`: grid expansion and naming, skip/resume, a killed cell resuming, and an end-to-end smoke sweep."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fdpo.errors import RecipeError
from fdpo.sweep import cell_name, parse_sweep, plan, run_sweep
from fdpo.sweep.report import REPORT_DIR

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "recipes" / "tiny" / "grpo" / "grpo_none.yaml"
REPORT_FILES = ("report.md", "report.json", "pass_at_k_eval.png", "reward_vs_diversity_eval.png",
                "kl_vs_reward_eval.png", "pass_at_k_ood.png", "reward_vs_diversity_ood.png", "kl_vs_reward_ood.png")


def _write(path: Path, payload: dict) -> Path:
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def _tiny_sweep(tmp: Path, sft: Path, *, methods: dict, seeds: list[int], steps: int = 2, save_steps: int | None = None,
                **extra) -> Path:
    """A few-step GRPO sweep from the tiny SFT model, with one shared data stage and both eval splits."""
    overrides = {"model_name_or_path": str(sft), "dataset_name": {"from_stage": "data", "file": "rl.jsonl"},
                 "max_steps": steps, "num_generations": 4, "per_device_train_batch_size": 8,
                 "eval_task": None, "logging_steps": 1, "save_strategy": "no"}
    if save_steps:
        overrides.update({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": None})
    return _write(tmp / "sweep.yaml", {
        "description": "smoke", "run_dir": str(tmp / "run"),
        "shared": [{"name": "data", "kind": "data", "task": "sum_pairs", "seed": 0}],
        "start": str(sft),
        "base": {"recipe": str(GRPO), "overrides": overrides},
        "methods": methods, "seeds": seeds,
        "eval": {"task": "sum_pairs", "splits": ["eval", "ood"], "num_samples": 8, "num_prompts": 6, "seed": 3},
        **extra,
    })


def test_grid_expansion_and_cell_names(tmp_path):
    path = _write(tmp_path / "s.yaml", {
        "run_dir": str(tmp_path / "run"), "base": {"recipe": str(GRPO), "overrides": {"max_steps": 3}},
        "methods": {"grpo": {}, "rkl": {"divergence": "reverse_kl", "divergence_coef": 0.05}},
        "grid": {"learning_rate": [1.0e-3, 3.0e-4], "divergence": ["alpha(0.5)"]},
        "seeds": [0, 2], "baseline": "grpo-learning_rate=0.001-divergence=alpha_0.5_",
    })
    spec = parse_sweep(path)
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 1 * 2
    assert [c.name for c in cells[:4]] == [
        "grpo-learning_rate=0.001-divergence=alpha_0.5_-s0", "grpo-learning_rate=0.001-divergence=alpha_0.5_-s2",
        "grpo-learning_rate=0.0003-divergence=alpha_0.5_-s0", "grpo-learning_rate=0.0003-divergence=alpha_0.5_-s2",
    ]
    rkl = cells[-1]
    # base < method < grid point < seed, later wins
    assert rkl.overrides == {"max_steps": 3, "divergence": "alpha(0.5)", "divergence_coef": 0.05,
                             "learning_rate": 3.0e-4, "seed": 2}
    assert rkl.group == "rkl-learning_rate=0.0003-divergence=alpha_0.5_"
    assert len(spec.groups()) == 4
    assert cell_name("m", (), 1) == "m-s1" and cell_name("a b/c", (("k", [1, 2]),), None) == "a_b_c-k=_1_2_"


@pytest.mark.parametrize(
    ("change", "match"),
    [({"seedz": [0]}, "Did you mean 'seeds'"), ({"baseline": "nope"}, "baseline 'nope'"),
     ({"seeds": [0, 0]}, "distinct integers"), ({"grid": {"learning_rate": []}}, "non-empty list"),
     ({"base": {"recipe": "missing.yaml"}}, "does not exist"),
     ({"base": {"recipe": str(GRPO), "overrides": {"model_name_or_path": {"from_stage": "sft"}}}}, "not a shared stage"),
     ({"launcher": {"kind": "ray"}}, "not one of")],
)
def test_sweep_errors_name_the_key(tmp_path, change, match):
    payload = {"run_dir": str(tmp_path), "base": {"recipe": str(GRPO)}, "methods": {"grpo": {}}, **change}
    with pytest.raises(RecipeError, match=match):
        parse_sweep(_write(tmp_path / "bad.yaml", payload))


def test_dry_run_validates_cells_and_runs_nothing(tmp_path, capsys):
    path = _write(tmp_path / "s.yaml", {
        "run_dir": str(tmp_path / "run"), "base": {"recipe": str(GRPO)},
        "methods": {"grpo": {}, "typo": {"divergence_coeff": 0.1}}, "seeds": [0],
    })
    with pytest.raises(RecipeError, match="divergence_coef"):
        run_sweep(path, dry_run=True)
    _write(path, {"run_dir": str(tmp_path / "run"), "base": {"recipe": str(GRPO)}, "methods": {"grpo": {}},
                  "seeds": [0, 1]})
    assert run_sweep(path, dry_run=True) is None
    out = capsys.readouterr().out
    assert "2 cells" in out and "grpo-s0" in out and "grpo-s1" in out and "run" in out
    assert not (tmp_path / "run").exists()


def test_smoke_sweep_end_to_end_then_skip_and_rerun_from(tiny_sft_dir, tmp_path, capsys):
    path = _tiny_sweep(tmp_path, tiny_sft_dir, methods={"grpo": {}, "rkl": {"divergence": "reverse_kl",
                                                                            "divergence_coef": 0.05}},
                       seeds=[0, 1], baseline="grpo")
    report = run_sweep(path, jobs=2, poll_s=0.5)
    out = capsys.readouterr().out
    assert "running:" in out and "left" in out
    run = tmp_path / "run"
    for name in REPORT_FILES:
        assert (run / REPORT_DIR / name).is_file(), name
    assert report["cells"] == {"total": 4, "complete": 4, "pending": []}
    for split in ("eval", "ood"):
        rows = report["splits"][split]["rows"]
        assert list(rows) == ["start", "grpo", "rkl"]
        assert rows["grpo"]["seeds"] == [0, 1] and rows["start"]["num_prompts"] == 6
        curve = rows["rkl"]["pass_at_k_curve"]["mean"]
        assert len(curve) == 8 and all(a <= b + 1e-12 for a, b in itertools.pairwise(curve))
        assert rows["rkl"]["metrics"]["pass@1"]["mean"] == pytest.approx(rows["rkl"]["metrics"]["mean_reward"]["mean"])
        assert set(rows["rkl"]["delta_vs_baseline"]) >= {"pass@1", "pass@8", "distinct_correct", "kl_to_start"}
        assert "delta_vs_start" in rows["grpo"] and "delta_vs_baseline" not in rows["grpo"]
    # every cell is an ordinary run directory with its resolved recipe
    cell = run / "cells" / "rkl-s1"
    assert (cell / "train" / "fdpo_run_complete.json").is_file()
    assert (cell / "train" / "fdpo_recipe.resolved.yaml").is_file()
    recipe = yaml.safe_load((cell / "recipe.yaml").read_text())
    assert recipe["divergence"] == "reverse_kl" and recipe["seed"] == 1
    assert recipe["dataset_name"] == str(run / "shared" / "data" / "rl.jsonl")
    md = (run / REPORT_DIR / "report.md").read_text()
    assert "Δ vs baseline `grpo`" in md and "| rkl |" in md
    # the per-seed tables in the report are the cells' own eval files
    evals = [json.loads((run / "cells" / f"grpo-s{s}" / "eval_eval" / "eval.json").read_text()) for s in (0, 1)]
    mean_reward = sum(p["correct"] for e in evals for p in e["per_prompt"]) / (2 * 6 * 8)
    assert report["splits"]["eval"]["rows"]["grpo"]["metrics"]["mean_reward"]["mean"] == pytest.approx(mean_reward)

    # rerun: everything is skipped; --from reruns that cell and the later ones only
    spec = parse_sweep(path)
    assert [what for _, what in plan(spec)] == ["skip"] * 4
    assert [what for _, what in plan(spec, "rkl-s0")] == ["skip", "skip", "rerun", "rerun"]
    before = (run / "cells" / "grpo-s1" / "train" / "fdpo_run_complete.json").stat().st_mtime
    run_sweep(path, jobs=1, from_cell="rkl-s1", poll_s=0.5)
    assert (run / "cells" / "grpo-s1" / "train" / "fdpo_run_complete.json").stat().st_mtime == before
    assert "skip  grpo-s0" in capsys.readouterr().out
    # a changed sweep over finished cells is an error, not a silent mix
    text = path.read_text().replace("divergence_coef: 0.05", "divergence_coef: 0.1")
    path.write_text(text)
    with pytest.raises(RecipeError, match="different contents"):
        run_sweep(path, jobs=1)


def test_killed_cell_resumes_to_the_same_result(tiny_sft_dir, tmp_path):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    kwargs = {"methods": {"grpo": {}}, "seeds": [0], "steps": 6, "save_steps": 2}
    run_sweep(_tiny_sweep(ref_dir, tiny_sft_dir, **kwargs), poll_s=0.5)
    path = _tiny_sweep(kill_dir, tiny_sft_dir, **kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fdpo", "sweep", str(path)], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = kill_dir / "run" / "cells" / "grpo-s0" / "train" / "checkpoint-4" / "fdpo_checkpoint_complete.json"
    deadline = time.time() + 600
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its cell, mid-training
    proc.wait()
    assert marker.is_file(), "the cell should have saved checkpoint-4 before the kill"
    train = kill_dir / "run" / "cells" / "grpo-s0" / "train"
    assert not (train / "fdpo_run_complete.json").is_file(), "killed too late: the run had already finished"
    assert [what for _, what in plan(parse_sweep(path))] == ["resume"]
    run_sweep(path, poll_s=0.5)
    log = (kill_dir / "run" / "cells" / "grpo-s0" / "cell.log").read_text()
    assert "resuming" in log
    got = json.loads((kill_dir / "run" / "cells" / "grpo-s0" / "eval_eval" / "eval.json").read_text())
    want = json.loads((ref_dir / "run" / "cells" / "grpo-s0" / "eval_eval" / "eval.json").read_text())
    assert got["per_prompt"] == want["per_prompt"]
    import torch  # local: only this test compares weights
    from safetensors.torch import load_file

    a = load_file(str(train / "model.safetensors"))
    b = load_file(str(ref_dir / "run" / "cells" / "grpo-s0" / "train" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_submitit_local_launcher_runs_a_cell_through_accelerate_launch(tiny_sft_dir, tmp_path):
    pytest.importorskip("submitit")
    config = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
    path = _tiny_sweep(tmp_path, tiny_sft_dir, methods={"grpo": {}}, seeds=[0], steps=1,
                       launcher={"kind": "submitit", "cluster": "local", "accelerate_config": str(config),
                                 "timeout_min": 10})
    report = run_sweep(path, poll_s=0.5)
    assert report["cells"]["complete"] == 1
    cell = tmp_path / "run" / "cells" / "grpo-s0"
    info = json.loads((cell / "train" / "fdpo_run_complete.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 1  # launched as a single run is: 2 gloo processes
    assert "accelerate.commands.launch" in (cell / "cell.log").read_text()
    assert list((tmp_path / "run" / "submitit").glob("*_result.pkl"))
