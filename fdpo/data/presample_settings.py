"""What `fdpo presample` runs with: its recipe keys and the settings resolved from a loaded recipe.

The generation settings are the training config's own (a `trl.GRPOConfig`, usually fdpo's
`FGRPOConfig`): ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
``max_completion_length``, ``generation_kwargs``, ``chat_template_kwargs``, ``cache_implementation``,
``cast_lm_head_to_fp32``, so the samples match what training would draw (docs/objectives.md §7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fdpo.data.rehearsal import dph_dir
from fdpo.errors import RecipeError


@dataclass
class PresampleArguments:
    """Recipe keys of `fdpo presample` (a trainer config that defines a key of its own wins)."""

    presample_n: int = field(
        default=8, metadata={"help": "DPH-RL: completions sampled per training prompt before RL (paper: 8)."}
    )
    pef_threshold: float = field(
        default=1.0,
        metadata={
            "help": "DPH-RL: a prompt joins D_pef (rehearsed, not trained on with RL) when at least this "
            "fraction of its presample_n completions is correct; 1.0 = solved every time (the paper)."
        },
    )
    presample_correct_reward: float = field(
        default=1.0,
        metadata={"help": "DPH-RL: a completion is correct when its weighted total reward is ≥ this value."},
    )
    presample_batch_size: int = field(
        default=64, metadata={"help": "DPH-RL: sequences per generate call and per log π_ref forward."}
    )
    presample_seed: int | None = field(
        default=None, metadata={"help": "DPH-RL: sampling seed for `fdpo presample` (default: the recipe's seed)."}
    )
    presample_dir: str | None = field(
        default=None,
        metadata={"help": "DPH-RL: where `fdpo presample` writes the rehearsal store (default: <output_dir>/dph)."},
    )
    reward_funcs: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Reward functions (names from fdpo.rewards or dotted paths to user functions), as "
            "TRL's GRPO script takes them."
        },
    )


@dataclass
class PresampleSettings:
    """Everything `presample` uses, resolved from a recipe (see :func:`resolve_presample_settings`)."""

    recipe_path: str
    model_name_or_path: str
    model_revision: str | None
    dtype: str | None
    dataset_name: str
    dataset_config: str | None
    dataset_train_split: str
    output_dir: str
    out_dir: str
    reward_funcs: list[str]
    reward_weights: list[float] | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    max_completion_length: int
    generation_kwargs: dict[str, Any] | None
    chat_template_kwargs: dict[str, Any] | None
    cache_implementation: str | None
    cast_lm_head_to_fp32: bool
    seed: int
    n: int
    pef_threshold: float
    correct_reward: float
    batch_size: int

    def generation_manifest(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "max_completion_length": self.max_completion_length,
            "generation_kwargs": self.generation_kwargs,
            "n": self.n,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "do_sample": True,
            "logps": "log_softmax(logits / temperature) of the sampled tokens, teacher-forced forward through "
            f"TRL's fused LM head (cast_lm_head_to_fp32={self.cast_lm_head_to_fp32}), model dtype {self.dtype}",
        }


def _as_dict(value: Any, key: str, where: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except (TypeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{where}: key '{key}' must be a mapping (or a JSON string of one), got {value!r}") from exc
    if not isinstance(out, dict):
        raise RecipeError(f"{where}: key '{key}' must be a mapping, got {value!r}")
    return out


def resolve_presample_settings(recipe: Any) -> PresampleSettings:
    """The settings of a LOADED recipe (fdpo.recipe's `load_presample_recipe`, which checked every key).

    ``recipe`` carries ``path``, ``recipe_args``, ``model_args``, ``training_args`` (a GRPOConfig: the
    generation settings are read from it) and ``presample_args`` (the :class:`PresampleArguments`; the
    training config itself when it mixes them in, as FGRPOConfig does). Values out of range are a
    `RecipeError` naming the key and the file.
    """
    where = str(recipe.path)
    cfg, pre, data, model_args = recipe.training_args, recipe.presample_args, recipe.recipe_args, recipe.model_args
    reward_funcs = getattr(cfg, "reward_funcs", None) or pre.reward_funcs
    if isinstance(reward_funcs, str):
        reward_funcs = [reward_funcs]
    if not reward_funcs:
        raise RecipeError(
            f"{where}: missing key 'reward_funcs' (e.g. `reward_funcs: [sum_pairs]`): presample verifies each "
            "sample with the training reward."
        )
    if pre.presample_n < 1:
        raise RecipeError(f"{where}: key 'presample_n' must be ≥ 1, got {pre.presample_n}.")
    if not 0.0 < pre.pef_threshold <= 1.0:
        raise RecipeError(
            f"{where}: key 'pef_threshold' must be in (0, 1] (a fraction of presample_n), got {pre.pef_threshold}."
        )
    if pre.presample_batch_size < 1:
        raise RecipeError(f"{where}: key 'presample_batch_size' must be ≥ 1, got {pre.presample_batch_size}.")
    if not cfg.temperature > 0:
        raise RecipeError(f"{where}: key 'temperature' must be > 0 for sampling, got {cfg.temperature}.")
    if cfg.max_completion_length is None:
        raise RecipeError(f"{where}: key 'max_completion_length' must be set for presampling.")
    dtype = model_args.dtype
    return PresampleSettings(
        recipe_path=where,
        model_name_or_path=str(model_args.model_name_or_path),
        model_revision=model_args.model_revision,
        dtype=None if dtype in (None, "auto") else str(dtype),
        dataset_name=str(data.dataset_name),
        dataset_config=data.dataset_config,
        dataset_train_split=data.dataset_train_split,
        output_dir=str(cfg.output_dir),
        out_dir=str(pre.presample_dir or dph_dir(cfg.output_dir)),
        reward_funcs=list(reward_funcs),
        reward_weights=cfg.reward_weights,
        temperature=float(cfg.temperature),
        top_p=float(cfg.top_p),
        top_k=int(cfg.top_k or 0),
        min_p=cfg.min_p,
        repetition_penalty=float(cfg.repetition_penalty),
        max_completion_length=int(cfg.max_completion_length),
        generation_kwargs=_as_dict(cfg.generation_kwargs, "generation_kwargs", where),
        chat_template_kwargs=_as_dict(cfg.chat_template_kwargs, "chat_template_kwargs", where),
        cache_implementation=cfg.cache_implementation,
        cast_lm_head_to_fp32=bool(cfg.cast_lm_head_to_fp32),
        seed=int(pre.presample_seed if pre.presample_seed is not None else cfg.seed),
        n=int(pre.presample_n),
        pef_threshold=float(pre.pef_threshold),
        correct_reward=float(pre.presample_correct_reward),
        batch_size=int(pre.presample_batch_size),
    )


__all__ = ["PresampleArguments", "PresampleSettings", "resolve_presample_settings"]
