"""Which trainer a recipe's `trainer:` key names, what data it needs, and how it is built.

Imports of the heavy trainer modules are lazy so that `fdpo --help` and recipe validation stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fdpo.errors import RecipeError, nearest


@dataclass(frozen=True)
class TrainerSpec:
    """One objective: its trainer/config classes and its data contract."""

    name: str
    module: str
    trainer_name: str
    config_name: str
    # alternatives: the data must have all columns of at least one of these sets
    column_sets: tuple[tuple[str, ...], ...]
    text_columns: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    def trainer_class(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.trainer_name)

    def required_columns(self, available: list[str]) -> tuple[str, ...]:
        """The first column set that `available` satisfies, else the first (for the error message)."""
        for cols in self.column_sets:
            if all(c in available for c in cols):
                return cols
        return self.column_sets[0]


TRAINERS: dict[str, TrainerSpec] = {
    "sft": TrainerSpec(
        name="sft",
        module="fdpo.trainers.sft",
        trainer_name="FSFTTrainer",
        config_name="FSFTConfig",
        column_sets=(("prompt", "completion"), ("messages",), ("text",)),
        text_columns=("prompt", "completion", "messages", "text"),
    ),
    "dpo": TrainerSpec(
        name="dpo",
        module="fdpo.trainers.dpo",
        trainer_name="FDPOTrainer",
        config_name="FDPOConfig",
        column_sets=(("prompt", "chosen", "rejected"),),
        text_columns=("prompt", "chosen", "rejected"),
    ),
    "distill": TrainerSpec(
        name="distill",
        module="fdpo.trainers.distill",
        trainer_name="FDistillTrainer",
        config_name="FDistillConfig",
        column_sets=(("messages",), ("prompt", "completion")),
        text_columns=("prompt", "completion", "messages"),
    ),
    "grpo": TrainerSpec(
        name="grpo",
        module="fdpo.trainers.grpo_trainer",
        trainer_name="FGRPOTrainer",
        config_name="FGRPOConfig",
        column_sets=(("prompt",),),
        text_columns=("prompt",),
    ),
    "d2o": TrainerSpec(
        name="d2o",
        module="fdpo.trainers.d2o",
        trainer_name="FD2OTrainer",
        config_name="FD2OConfig",
        column_sets=(("prompt", "rejected"),),
        text_columns=("prompt", "rejected"),
    ),
    "token_dpo": TrainerSpec(
        name="token_dpo",
        module="fdpo.trainers.token_dpo",
        trainer_name="TokenDPOTrainer",
        config_name="TokenDPOConfig",
        column_sets=(("prompt", "chosen", "rejected"),),
        text_columns=("prompt", "chosen", "rejected"),
    ),
}


def get_trainer_spec(name: str) -> TrainerSpec:
    if name not in TRAINERS:
        hint = nearest(name, TRAINERS)
        extra = f" Did you mean '{hint}'?" if hint else ""
        raise RecipeError(f"unknown trainer '{name}'; valid: {sorted(TRAINERS)}.{extra}")
    return TRAINERS[name]
