"""Post-DPO SFT (docs/objectives.md §2): the DPO checkpoint is both the policy and the reference at step 0, the
learning rate is scaled by `lr_scale`, and a pipeline stage can name the DPO stage's output for both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fdpo.pipeline import run_pipeline
from fdpo.recipe import load_recipe
from fdpo.train import load_datasets, load_model_and_tokenizer, run_training
from fdpo.trainers.checkpoints import RESOLVED_RECIPE
from fdpo.trainers.registry import get_trainer_spec

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
FAST = {"save_strategy": "no", "logging_steps": 1, "per_device_train_batch_size": 8, "warmup_steps": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dpo_dir(tiny_model_dir, task_data_dir, tmp_path_factory) -> Path:
    """A 3-step f-DPO (JS) checkpoint trained through recipes/tiny/dpo/dpo_js.yaml from the tiny model."""
    out = tmp_path_factory.mktemp("dpo") / "dpo"
    recipe = load_recipe(TINY / "dpo" / "dpo_js.yaml", {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(task_data_dir / "preference.jsonl"),
        "eval_dataset_name": None, "eval_strategy": "no",
        "output_dir": str(out), "max_steps": 3, "learning_rate": 1e-2, **FAST,
    })
    run_training(recipe)
    return out


def _build(recipe):
    spec = get_trainer_spec(recipe.recipe_args.trainer)
    train_ds, _ = load_datasets(recipe)
    model, tok = load_model_and_tokenizer(recipe)
    return spec.trainer_class()(model=model, args=recipe.training_args, train_dataset=train_ds, processing_class=tok)


def test_post_dpo_sft_starts_with_policy_equal_reference_equal_dpo_weights(dpo_dir, tiny_model_dir, task_data_dir,
                                                                           tmp_path):
    from safetensors.torch import load_file

    recipe = load_recipe(TINY / "sft" / "post_dpo_sft.yaml", {
        "model_name_or_path": str(dpo_dir), "dataset_name": str(task_data_dir / "sft.jsonl"),
        "output_dir": str(tmp_path / "post"), "max_steps": 2, **FAST,
    })
    args = recipe.training_args
    assert args.lr_scale == 0.1 and args.learning_rate == pytest.approx(args.base_learning_rate * 0.1)
    trainer = _build(recipe)
    assert trainer.ref_model is not None and trainer.ref_is_start and trainer.divergence_coef > 0
    saved = load_file(str(dpo_dir / "model.safetensors"))
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    ref = dict(trainer.ref_model.named_parameters())
    moved = False
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, ref[name]), name  # reference = policy at step 0
        if name in saved:
            assert torch.equal(p, saved[name]), name  # = the DPO checkpoint
            moved |= not torch.equal(saved[name], start[name])
    assert moved  # the DPO run did change the weights, so the check is not vacuous
    trainer.create_optimizer()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([3e-4] * len(trainer.optimizer.param_groups))
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["kl_to_start"] == pytest.approx(0.0, abs=1e-6) and first["div/js"] == pytest.approx(0.0, abs=1e-6)


def test_pipeline_post_dpo_stage_names_the_dpo_stage_for_policy_and_reference(tmp_path):
    run_dir = tmp_path / "run"
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "stages": [
        {"name": "model", "kind": "tiny", "seed": 0},
        {"name": "data", "kind": "data", "task": "sum_pairs"},
        {"name": "dpo", "kind": "train", "recipe": str(TINY / "dpo" / "dpo_js.yaml"), "overrides": {
            "model_name_or_path": {"from_stage": "model"},
            "dataset_name": {"from_stage": "data", "file": "preference.jsonl"},
            "eval_dataset_name": None, "eval_strategy": "no", "max_steps": 2, **FAST}},
        {"name": "post_dpo_sft", "kind": "train", "recipe": str(TINY / "sft" / "post_dpo_sft.yaml"), "overrides": {
            "model_name_or_path": {"from_stage": "dpo"},
            "ref_model_name_or_path": {"from_stage": "dpo"},
            "dataset_name": {"from_stage": "data", "file": "sft.jsonl"}, "max_steps": 2, **FAST}},
    ]}, sort_keys=False))
    results = run_pipeline(pipe)
    assert [r.status for r in results] == ["ran"] * 4
    resolved = yaml.safe_load((run_dir / "post_dpo_sft" / RESOLVED_RECIPE).read_text())
    assert resolved["model_name_or_path"] == str(run_dir / "dpo")
    assert resolved["ref_model_name_or_path"] == str(run_dir / "dpo")
    assert resolved["learning_rate"] == pytest.approx(resolved["base_learning_rate"] * resolved["lr_scale"])
    import json

    history = json.loads((run_dir / "post_dpo_sft" / "fdpo_run_complete.json").read_text())["log_history"]
    # the reference named by path is the starting model: KL 0 before the first update
    assert history[0]["kl_to_start"] == pytest.approx(0.0, abs=1e-6)
