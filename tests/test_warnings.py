"""A tiny training stage shows no warning fdpo can prevent; the filters for the rest are narrow.

pyproject's pytest `filterwarnings` ignores DeprecationWarning/FutureWarning for the whole suite, so each
test here records with `simplefilter("always")` inside `warnings.catch_warnings(record=True)`: the
filters that count are fdpo's own (`fdpo.warning_filters`), nothing else.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _describe(records: list[warnings.WarningMessage]) -> str:
    return "\n".join(f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in records)


@pytest.mark.parametrize(
    "recipe,data,extra",
    [
        # f-SFT with a JS regulariser: reference model, full-vocabulary divergence, TRL's SFT dataloader
        ("sft/post_dpo_sft.yaml", {"dataset_name": "sft.jsonl"}, {}),
        # f-DPO (the quickstart's): reference log-probs precomputed through TRL's dataloader and TRL's
        # disable_gradient_checkpointing helper, an eval pass
        ("dpo/dpo_js.yaml", {"dataset_name": "preference.jsonl", "eval_dataset_name": "preference_eval.jsonl"},
         {"eval_steps": 2}),
    ],
    ids=["f-sft", "f-dpo"],
)
def test_tiny_training_stage_emits_no_preventable_warning(recipe, data, extra, tiny_sft_dir, task_data_dir, tmp_path):
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    overrides = {
        "model_name_or_path": str(tiny_sft_dir),
        **{k: str(task_data_dir / v) for k, v in data.items()},
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        **extra,
    }
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        metrics = run_training(load_recipe(RECIPES / "tiny" / recipe, overrides))
    assert metrics["global_step"] == 2
    assert not records, "warnings fdpo could prevent or filter:\n" + _describe(records)


def test_filters_are_narrow():
    """The known TRL → transformers deprecation is ignored only with its message, category and module."""
    from fdpo.warning_filters import unpreventable_warnings_filtered

    msg = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead."
    cases = {
        "filtered": (msg, FutureWarning, "transformers.modeling_utils"),
        "other module": (msg, FutureWarning, "my_project.train"),
        "other category": (msg, UserWarning, "transformers.modeling_utils"),
        "other message": ("`foo` is deprecated and will be removed in v6.", FutureWarning, "transformers.modeling_utils"),
    }
    shown = {}
    for name, (message, category, module) in cases.items():
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            with unpreventable_warnings_filtered():
                warnings.warn_explicit(message, category, filename="x.py", lineno=1, module=module)
        shown[name] = len(records)
    assert shown == {"filtered": 0, "other module": 1, "other category": 1, "other message": 1}
    with warnings.catch_warnings(record=True) as records:  # and the filters end with the block
        warnings.simplefilter("always")
        with unpreventable_warnings_filtered():
            pass
        warnings.warn_explicit(msg, FutureWarning, filename="x.py", lineno=1, module="transformers.modeling_utils")
    assert len(records) == 1


def test_machine_defaults_keep_a_users_explicit_choice(tmp_path):
    """fdpo sets pin_memory off (no accelerator) and the current checkpointing name only where the recipe is silent."""
    import torch

    from fdpo.recipe import load_recipe

    base = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "output_dir": str(tmp_path)}
    silent = load_recipe(RECIPES / "tiny" / "sft" / "sft.yaml", base).training_args
    assert silent.dataloader_pin_memory is torch.accelerator.is_available()
    assert silent.activation_checkpointing is True and silent.gradient_checkpointing is True  # TRL's default
    explicit = load_recipe(
        RECIPES / "tiny" / "sft" / "sft.yaml", {**base, "dataloader_pin_memory": True, "activation_checkpointing": False}
    ).training_args
    assert explicit.dataloader_pin_memory is True
    assert explicit.activation_checkpointing is False and explicit.gradient_checkpointing is False
    with warnings.catch_warnings(record=True) as records:  # the deprecated name is the user's to rename
        warnings.simplefilter("always")
        old = load_recipe(RECIPES / "tiny" / "sft" / "sft.yaml", {**base, "gradient_checkpointing": False}).training_args
    assert old.activation_checkpointing is False
    assert any("gradient_checkpointing" in str(w.message) for w in records)


def test_presample_recipe_loads_without_warnings(tmp_path):
    """`fdpo presample` builds the GRPO config with the same machine defaults, and no blanket filter."""
    from fdpo.recipe.presample import load_presample_recipe

    base = {"model_name_or_path": "m", "dataset_name": "d.jsonl", "output_dir": str(tmp_path)}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        recipe = load_presample_recipe(RECIPES / "tiny" / "grpo" / "dph_js.yaml", base)
    assert not records, _describe(records)
    assert recipe.training_args.activation_checkpointing is True
