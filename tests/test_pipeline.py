"""Pipelines: stages in order, complete stages skipped, `--from` reruns later stages only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fdpo.errors import RecipeError
from fdpo.pipeline import parse_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_parse_errors_name_stage_and_key(tmp_path):
    with pytest.raises(RecipeError, match=r"stage 0 \('m'\): kind 'tinyy'.*'tiny'"):
        parse_pipeline(_write(tmp_path, {"run_dir": "r", "stages": [{"name": "m", "kind": "tinyy"}]}))
    with pytest.raises(RecipeError, match=r"unknown key 'sed'.*'seed'"):
        parse_pipeline(_write(tmp_path, {"run_dir": "r", "stages": [{"name": "m", "kind": "tiny", "sed": 1}]}))
    bad_ref = {
        "run_dir": "r",
        "stages": [{"name": "e", "kind": "eval", "checkpoint": {"from_stage": "later"}},
                   {"name": "later", "kind": "tiny"}],
    }
    with pytest.raises(RecipeError, match="not an earlier stage"):
        parse_pipeline(_write(tmp_path, bad_ref))
    with pytest.raises(RecipeError, match="duplicate"):
        parse_pipeline(_write(tmp_path, {"run_dir": "r", "stages": [{"name": "a", "kind": "tiny"}] * 2}))


def test_quickstart_recipe_parses():
    _run_dir, stages = parse_pipeline(REPO / "recipes" / "tiny" / "pipelines" / "quickstart.yaml")
    assert [s.kind for s in stages][:2] == ["tiny", "data"]


def _sft_pipeline(tmp_path, run_dir, **sft_overrides):
    """A pipeline file: tiny model → data → a short SFT stage with `sft_overrides`."""
    return _write(
        tmp_path,
        {
            "run_dir": str(run_dir),
            "stages": [
                {"name": "model", "kind": "tiny", "seed": 0},
                {"name": "data", "kind": "data", "task": "sum_pairs"},
                {
                    "name": "sft",
                    "kind": "train",
                    "recipe": str(REPO / "recipes" / "tiny" / "sft" / "sft.yaml"),
                    "overrides": {
                        "model_name_or_path": {"from_stage": "model"},
                        "dataset_name": {"from_stage": "data", "file": "sft.jsonl"},
                        "per_device_train_batch_size": 4,
                        **sft_overrides,
                    },
                },
            ],
        },
    )


def test_skip_and_from(tmp_path):
    run_dir = tmp_path / "run"
    pipe = _sft_pipeline(tmp_path, run_dir, max_steps=2, save_strategy="no")
    first = run_pipeline(pipe)
    assert [r.status for r in first] == ["ran", "ran", "ran"]
    assert (run_dir / "pipeline_summary.json").is_file()
    second = run_pipeline(pipe)
    assert [r.status for r in second] == ["skipped", "skipped", "skipped"]
    third = run_pipeline(pipe, from_stage="sft")
    assert [r.status for r in third] == ["skipped", "skipped", "ran"]
    with pytest.raises(RecipeError, match="no such stage"):
        run_pipeline(pipe, from_stage="sfft")


def test_killed_train_stage_resumes_to_the_same_final_metrics(tmp_path):
    """A train stage stopped after its step-3 checkpoint resumes on the next run and ends with the metrics
    of the uninterrupted run (same losses at every later step, same final loss)."""
    import json
    import shutil

    from fdpo.trainers.checkpoints import RUN_MARKER, checkpoint_dirs

    run_dir = tmp_path / "run"
    pipe = _sft_pipeline(
        tmp_path, run_dir, max_steps=6, warmup_steps=0, logging_steps=1, save_strategy="steps", save_steps=3
    )
    uninterrupted = run_pipeline(pipe)[-1]
    out = run_dir / "sft"
    full_losses = {h["step"]: h["loss"] for h in json.loads((out / RUN_MARKER).read_text())["log_history"] if "loss" in h}
    # the kill: after the step-3 checkpoint, before step 6 and the final save
    for ckpt in checkpoint_dirs(out):
        if ckpt.name != "checkpoint-3":
            shutil.rmtree(ckpt)
    (out / RUN_MARKER).unlink()
    (out / "model.safetensors").unlink()
    second = run_pipeline(pipe)
    assert [r.status for r in second] == ["skipped", "skipped", "resumed"]
    resumed = second[-1]
    info = json.loads((out / RUN_MARKER).read_text())
    assert info["resumed_from"].endswith("checkpoint-3")
    assert resumed.metrics["steps"] == uninterrupted.metrics["steps"] == 6
    assert resumed.metrics["final_loss"] == pytest.approx(uninterrupted.metrics["final_loss"], rel=1e-5)
    losses = {h["step"]: h["loss"] for h in info["log_history"] if "loss" in h}
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)
    assert (out / "model.safetensors").is_file()


def test_edited_stage_reruns_and_so_do_its_consumers(tmp_path):
    run_dir = tmp_path / "run"
    pipe = _sft_pipeline(tmp_path, run_dir, max_steps=2, save_strategy="no")
    data = yaml.safe_load(pipe.read_text())
    data["stages"].append({"name": "again", "kind": "train", "recipe": data["stages"][2]["recipe"],
                           "overrides": {**data["stages"][2]["overrides"], "model_name_or_path": {"from_stage": "sft"}}})
    pipe.write_text(yaml.safe_dump(data, sort_keys=False))
    assert [r.status for r in run_pipeline(pipe)] == ["ran"] * 4
    data["stages"][2]["overrides"]["learning_rate"] = 2.0e-3  # edit the sft stage only
    pipe.write_text(yaml.safe_dump(data, sort_keys=False))
    assert [r.status for r in run_pipeline(pipe)] == ["skipped", "skipped", "ran", "ran"]
    assert [r.status for r in run_pipeline(pipe)] == ["skipped"] * 4
