"""Loading a training recipe for `fdpo presample` (DPH-RL's pre-sampling stage, docs/objectives.md §7).

The presample stage reads the GRPO recipe that will train: every key is checked as `fdpo train` checks
it (unknown keys and wrong types are errors naming the key and the file), against the recipe's trainer
config plus `PresampleArguments` (a key the trainer config defines itself wins; FGRPOConfig mixes
PresampleArguments in). A ``trainer`` not registered in fdpo is checked against TRL's ``GRPOConfig``,
with a warning. The loaded recipe then goes to `fdpo.data.presample.run_presample`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import GRPOConfig, ModelConfig

from fdpo.data.presample import run_presample
from fdpo.data.presample_settings import PresampleArguments
from fdpo.errors import RecipeError
from fdpo.recipe.load import (
    Recipe,
    RecipeArguments,
    build_arguments,
    read_yaml,
    validate_keys,
)
from fdpo.trainers.registry import TRAINERS, get_trainer_spec


@dataclass
class PresampleRecipe(Recipe):
    """A recipe loaded for presampling: the three configs of `Recipe` plus the presample keys."""

    presample_args: Any = None  # PresampleArguments, or the training config when it mixes them in


def load_presample_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> PresampleRecipe:
    """Read, merge overrides into, and validate a recipe for presampling (see the module docstring)."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    raw.update(overrides or {})
    trainer = raw.get("trainer", "sft")
    if trainer in TRAINERS:
        config_cls = get_trainer_spec(trainer).config_class()
        checked = raw
    else:
        warnings.warn(
            f"{where}: trainer {trainer!r} is not registered in fdpo; checking the recipe against trl.GRPOConfig",
            stacklevel=2,
        )
        checked = {k: v for k, v in raw.items() if k != "trainer"}
        config_cls = GRPOConfig
    mixed_in = issubclass(config_cls, PresampleArguments)
    classes = [RecipeArguments, ModelConfig, config_cls] + ([] if mixed_in else [PresampleArguments])
    recipe_kw, model_kw, train_kw, *pre_kw = validate_keys(checked, classes, where=where)
    for key, kw in (("model_name_or_path", model_kw), ("output_dir", train_kw), ("dataset_name", recipe_kw)):
        if kw.get(key) is None:
            raise RecipeError(f"{where}: missing key '{key}', which `fdpo presample` needs.")
    if not issubclass(config_cls, GRPOConfig):
        raise RecipeError(
            f"{where}: key 'trainer' is {trainer!r}; `fdpo presample` samples at a GRPO recipe's generation "
            "settings, so it needs `trainer: grpo`."
        )
    recipe_args, model_args, training_args = build_arguments(recipe_kw, model_kw, train_kw, config_cls, where)
    try:
        presample_args = training_args if mixed_in else PresampleArguments(**pre_kw[0])
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: invalid combination of values: {exc}") from exc
    return PresampleRecipe(
        path=path,
        raw=raw,
        recipe_args=recipe_args,
        model_args=model_args,
        training_args=training_args,
        presample_args=presample_args,
    )


def presample_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`fdpo presample RECIPE --key value ...`: load the recipe, run the stage; returns the manifest."""
    return run_presample(load_presample_recipe(path, overrides))


__all__ = ["PresampleRecipe", "load_presample_recipe", "presample_recipe"]
