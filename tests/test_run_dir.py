"""Run directories that cannot lose or mix work: rotation order, locks, foreign dirs, resume checks, full disk."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest
import yaml

from fdpo.cli import main
from fdpo.errors import RunDirError
from fdpo.recipe import load_recipe
from fdpo.train import run_training
from fdpo.trainers import checkpoints
from fdpo.trainers.checkpoints import MARKER, RUN_MARKER, checkpoint_dirs, is_complete
from fdpo.trainers.run_dir import HOLDER_FILE, LOCK_FILE, RESUME_CHANGES


def _recipe(tmp: Path, model: Path, data: Path, out: Path, **changes) -> Path:
    base = {"trainer": "sft", "model_name_or_path": str(model), "dataset_name": str(Path(data) / "sft.jsonl"),
            "output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1.0e-3,
            "warmup_steps": 0, "logging_steps": 1, "save_strategy": "steps", "save_steps": 2,
            "save_total_limit": 1, "cpu_threads": 1, "report_to": "none", "seed": 0}
    base.update(changes)
    path = tmp / f"recipe_{out.name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _losses(metrics) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in metrics["log_history"] if "loss" in h}


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")
            if p.is_file() and p.name not in (LOCK_FILE, HOLDER_FILE)}


class Killed(Exception):
    """Stands in for a kill -9 between transformers' save and fdpo's completion marker."""


def test_kill_between_save_and_marker_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, task_data_dir,
                                                                     monkeypatch):
    full = run_training(load_recipe(_recipe(tmp_path, tiny_model_dir, task_data_dir, tmp_path / "full",
                                            save_strategy="no")))
    out = tmp_path / "cut"
    recipe = _recipe(tmp_path, tiny_model_dir, task_data_dir, out)
    original = checkpoints.CompleteCheckpointCallback.on_save

    def killed_at_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Killed
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(checkpoints.CompleteCheckpointCallback, "on_save", killed_at_4)
    with pytest.raises(Killed):
        run_training(load_recipe(recipe))
    monkeypatch.setattr(checkpoints.CompleteCheckpointCallback, "on_save", original)
    # save_total_limit: 1, yet the step-2 checkpoint survived: rotation waits for the new one's marker
    assert [c.name for c in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
    assert is_complete(out / "checkpoint-2") and not is_complete(out / "checkpoint-4")
    resumed = run_training(load_recipe(recipe), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    for step in (3, 4, 5, 6):
        assert _losses(resumed)[step] == pytest.approx(_losses(full)[step], rel=1e-5, abs=1e-6)
    assert [c.name for c in checkpoint_dirs(out)] == ["checkpoint-6"]  # rotation still keeps the limit
    assert len(list(out.glob("incomplete-checkpoint-*"))) == 1

    # a finished run resumed is "already complete" and writes nothing
    before = _snapshot(out)
    again = run_training(load_recipe(recipe), resume=True)
    assert again["already_complete"] and again["global_step"] == 6
    assert _snapshot(out) == before

    # the same recipe without --resume, and another recipe, are refused, naming the dir and the keys
    with pytest.raises(RunDirError, match="already holds a complete run of this recipe"):
        run_training(load_recipe(recipe))
    other = _recipe(tmp_path, tiny_model_dir, task_data_dir, out, learning_rate=5e-3)
    with pytest.raises(RunDirError, match=r"holds a complete run of another recipe.*learning_rate"):
        run_training(load_recipe(other))
    assert _snapshot(out) == before


def test_resume_refuses_a_changed_objective_and_records_safe_changes(tmp_path, tiny_model_dir, task_data_dir):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, task_data_dir, out, max_steps=2)
    run_training(load_recipe(recipe))
    (out / RUN_MARKER).unlink()  # as if killed after the step-2 checkpoint
    for key, value in (("learning_rate", 1e-2), ("divergence", "js"), ("max_steps", 1)):
        with pytest.raises(RunDirError, match=key):
            run_training(load_recipe(recipe, {key: value}), resume=True)
    resumed = run_training(load_recipe(recipe, {"max_steps": 3, "logging_steps": 2}), resume=True)
    assert resumed["global_step"] == 3 and resumed["resumed_from"].endswith("checkpoint-2")
    record = json.loads((out / RESUME_CHANGES).read_text())
    assert record[-1]["resumed_at_step"] == 2
    assert record[-1]["changed"] == {"logging_steps": {"old": 1, "new": 2}, "max_steps": {"old": 2, "new": 3}}


def test_locked_run_dir_refuses_a_second_run(tmp_path, tiny_model_dir, task_data_dir, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what filelock does for the first run
    (out / HOLDER_FILE).write_text(json.dumps({"pid": 4242, "host": "node7", "since": 0, "command": "fdpo train x"}))
    try:
        code = main(["train", str(_recipe(tmp_path, tiny_model_dir, task_data_dir, out))])
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "in use by another fdpo run" in err and "pid 4242 on node7" in err and str(out) in err


def test_full_disk_keeps_the_last_complete_checkpoint_and_names_the_path(tmp_path, tiny_model_dir, task_data_dir,
                                                                        monkeypatch, capsys):
    from transformers import Trainer

    out = tmp_path / "full_disk"
    original = Trainer._save_rng_state

    def no_space(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "rng_state.pth"))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", no_space)
    code = main(["train", str(_recipe(tmp_path, tiny_model_dir, task_data_dir, out))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no space left on device" in err and str(out / "checkpoint-4" / "rng_state.pth") in err
    assert "checkpoint-2 is intact" in err
    assert [c.name for c in checkpoint_dirs(out)] == ["checkpoint-2"] and (out / "checkpoint-2" / MARKER).is_file()


def test_every_row_too_long_is_one_error_naming_the_file(tmp_path, tiny_model_dir, task_data_dir, capsys):
    recipe = _recipe(tmp_path, tiny_model_dir, task_data_dir, tmp_path / "long", max_length=2)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sft.jsonl" in err and "max_length=2" in err and "every one of its" in err
