"""Training arguments as TRL's trainers accept them: none (a default named after the model), TRL's own config, or
(SFT) a plain `transformers.TrainingArguments`; each becomes the fdpo config class with every field kept."""

from __future__ import annotations

from typing import Any, TypeVar

import transformers
from packaging.version import Version
from transformers import TrainingArguments
from trl.trainer.utils import get_config_model_id

C = TypeVar("C", bound=TrainingArguments)


def default_args(config_cls: type[C], model: Any, suffix: str) -> C:
    """TRL's default when `args` is None: `config_cls(output_dir="<model name>-<suffix>")`."""
    name = model if isinstance(model, str) else get_config_model_id(model.config)
    return config_cls(f"{name.split('/')[-1]}-{suffix}")


def as_config(config_cls: type[C], args: TrainingArguments, accepted: type[TrainingArguments]) -> C:
    """`args` as a `config_cls`: returned as is when it already is one, else rebuilt from its fields the way
    TRL's SFTTrainer upgrades a `TrainingArguments` (`to_dict`, with the `*_token` fields it masks restored:
    `hub_token`, and TRL's `pad_token` / `eos_token`)."""
    if isinstance(args, config_cls):
        return args
    if not isinstance(args, accepted):
        raise TypeError(
            f"`args` must be a {config_cls.__name__} or a {accepted.__name__}, got {type(args).__name__}."
        )
    values = args.to_dict()
    for key in values:
        if key.endswith("_token"):  # to_dict writes "<KEY>" in place of every *_token value
            values[key] = getattr(args, key)
    if Version(transformers.__version__) < Version("5.0.0"):
        values.pop("push_to_hub_token", None)
    return config_cls(**values)
