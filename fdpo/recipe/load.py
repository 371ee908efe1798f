"""Reading a YAML recipe into TRL-style config dataclasses.

A recipe is one flat YAML mapping, as in TRL's own example configs: the keys are the fields of
`RecipeArguments` (fdpo's: which trainer, which data), TRL's `ModelConfig` (which model, LoRA) and
the chosen trainer's config class (e.g. `FSFTConfig`, a subclass of `trl.SFTConfig`). Every key is
checked before anything is built: unknown keys, wrong types and invalid choices are errors naming
the key, the file and the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from trl import ModelConfig

from fdpo.errors import RecipeError, nearest
from fdpo.recipe.validate import check_field, check_ranges
from fdpo.trainers.registry import TRAINERS, get_trainer_spec

TRAINER_NAMES = tuple(TRAINERS)


@dataclass
class RecipeArguments:
    """fdpo's own recipe keys: the objective and the data (TRL's `ScriptArguments`, extended)."""

    trainer: str = field(
        default="sft",
        metadata={"help": "Which objective/trainer runs the recipe.", "choices": list(TRAINER_NAMES)},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a local .json/.jsonl/.parquet/.csv file or directory, or a hub dataset "
            "name (needs network)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Optional evaluation data (same forms as dataset_name)."}
    )
    dataset_test_split: str = field(default="train", metadata={"help": "Split of eval_dataset_name used."})
    eval_task: str | None = field(
        default=None,
        metadata={"help": "Synthetic task to evaluate after training with `fdpo eval` (e.g. sum_pairs)."},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads while training on a CPU (None: torch's default, one per core). The tiny "
            "recipes set 1: a sub-million-parameter model gains nothing from more, and with 2 threads on a busy "
            "2-core machine each tiny step can be 10-100x slower. Ignored when a GPU is used."
        },
    )


@dataclass
class Recipe:
    """A validated recipe: where it came from and the three config objects it builds."""

    path: Path
    raw: dict[str, Any]
    recipe_args: RecipeArguments
    model_args: Any  # trl.ModelConfig
    training_args: Any  # the trainer's config, e.g. FSFTConfig

    def resolved(self) -> dict[str, Any]:
        """Every field of the three configs, as plain YAML-able values (written next to checkpoints)."""
        out: dict[str, Any] = {"fdpo_recipe": str(self.path)}
        for obj in (self.recipe_args, self.model_args, self.training_args):
            for f in dataclasses.fields(obj):
                out[f.name] = _plain(getattr(obj, f.name))
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`save_strategy: no` stays the string "no"),
    and `1e-3` is a float. A key given twice in one mapping is an error (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]}, again on line {line}): "
                    "keep one of them", key_node.start_mark,
                )
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool",)]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_override_value(text: str, *, key: str = "") -> Any:
    """A `--key value` override is parsed as YAML (so `--lr 1e-3`, `--use_peft true`, `--ks [1,4]` work)."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise RecipeError(
            f"command line: --{key} {text!r} is not a valid YAML value ({problem}). Quote it, e.g. --{key} '\"...\"'."
        ) from exc


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`['--learning_rate', '1e-3', '--max_steps=5']` → {'learning_rate': 0.001, 'max_steps': 5}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise RecipeError(f"command line: expected '--key value', got {token!r}.")
        key = token[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise RecipeError(f"command line: '--{key}' needs a value (e.g. --{key} 10).")
            text = argv[i + 1]
            i += 2
        out[key.replace("-", "_")] = parse_override_value(text, key=key)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist.")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give a recipe file (e.g. {path}/sft.yaml).")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}, line {line}: byte {raw[exc.start]:#04x} is not UTF-8. Re-save the recipe as UTF-8.") from exc
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of key: value, got {type(data).__name__}.")
    return data


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a forward reference we cannot resolve: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _coerce_yaml_float(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string: accept it where a float is wanted (lossless)."""
    if isinstance(value, str) and _FLOAT_RE.match(value):
        args = typing.get_args(tp) if typing.get_origin(tp) else (tp,)
        if float in args and str not in args:
            return float(value)
    return value


def validate_keys(
    data: dict[str, Any], classes: list[type], *, where: str, origins: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Split `data` over `classes` by field name, checking names and types of every value.

    `origins` maps a key to where its value came from when that is not `where` (e.g. "command line").
    """
    origins = origins or {}
    # a key several classes declare (e.g. `eval_task`: the recipe's and a trainer's own hook) goes to each
    owners: dict[str, list[tuple[int, dataclasses.Field, Any]]] = {}
    for idx, cls in enumerate(classes):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            owners.setdefault(f.name, []).append((idx, f, hints.get(f.name, f.type)))
    per_class: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in data.items():
        key_where = origins.get(key, where)
        if key not in owners:
            hint = nearest(key, owners)
            extra = f" Did you mean '{hint}'?" if hint else " Run `fdpo keys TRAINER` to list valid keys."
            raise RecipeError(f"{key_where}: unknown key '{key}'.{extra}")
        for idx, f, tp in owners[key]:
            coerced = _coerce_yaml_float(value, tp)
            checked_field = _with_type(f, tp)
            per_class[idx][key] = check_field(checked_field, coerced, where=key_where)
    return per_class


def _with_type(f: dataclasses.Field, tp: Any) -> dataclasses.Field:
    clone = dataclasses.field(default=None, metadata=f.metadata)
    clone.name = f.name
    clone.type = tp
    return clone


def all_keys(trainer: str) -> dict[str, str]:
    """Every valid recipe key for `trainer`, with its help text as argparse would print it.

    TRL and transformers write `%%` in help strings (argparse's escape for `%`); it is unescaped here.
    """
    spec = get_trainer_spec(trainer)
    out: dict[str, str] = {}
    for cls in (RecipeArguments, ModelConfig, spec.config_class()):
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, str(f.metadata.get("help", "")).split("\n")[0].replace("%%", "%"))
    return out


def default_precision_for_this_machine(train_kw: dict[str, Any]) -> None:
    """TRL defaults to bf16=True, which transformers refuses without a bf16 GPU. A recipe that does not
    set `bf16` runs in bf16 on a GPU and in fp32 on a CPU, so one recipe serves both."""
    if "bf16" not in train_kw and "fp16" not in train_kw and not torch.cuda.is_available():
        train_kw["bf16"] = False


def quiet_defaults_for_this_machine(train_kw: dict[str, Any], config_cls: type) -> None:
    """Defaults that keep a run free of warnings fdpo can prevent; a key the recipe sets is left alone.

    - `dataloader_pin_memory` (TrainingArguments: True) is off when torch finds no accelerator: pinned
      memory is unused there and torch warns once per dataloader ("no accelerator is found").
    - `activation_checkpointing` (transformers' current name) carries the config's default for
      `gradient_checkpointing` (TRL: True), so building the config does not trigger transformers'
      "`gradient_checkpointing` is deprecated" FutureWarning; the value, and so training, is unchanged.
      A recipe that writes `gradient_checkpointing` itself still gets that warning (rename the key).
    """
    if "dataloader_pin_memory" not in train_kw and not torch.accelerator.is_available():
        train_kw["dataloader_pin_memory"] = False
    if "activation_checkpointing" not in train_kw and "gradient_checkpointing" not in train_kw:
        default = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("gradient_checkpointing")
        if isinstance(default, bool):
            train_kw["activation_checkpointing"] = default


def load_recipe(
    path: str | Path, overrides: dict[str, Any] | None = None, *, overrides_from: str = "command line"
) -> Recipe:
    """Read, merge overrides into, and validate a recipe; build its config objects.

    An error in an override names `overrides_from` (where the overrides came from), not the recipe file.
    """
    path = Path(path)
    raw = read_yaml(path)
    overrides = overrides or {}
    raw.update(overrides)
    where = str(path)
    origins = {key: f"{overrides_from} (--{key}, overriding {path})" for key in overrides}
    trainer = raw.get("trainer", "sft")
    if trainer not in TRAINER_NAMES:
        hint = nearest(str(trainer), TRAINER_NAMES)
        extra = f" Did you mean '{hint}'?" if hint else ""
        raise RecipeError(
            f"{origins.get('trainer', where)}: key 'trainer' is {trainer!r}; valid trainers: {list(TRAINER_NAMES)}.{extra}"
        )
    spec = get_trainer_spec(trainer)
    config_cls = spec.config_class()
    recipe_kw, model_kw, train_kw = validate_keys(
        raw, [RecipeArguments, ModelConfig, config_cls], where=where, origins=origins
    )
    check_ranges(raw, where=where, origins=origins)
    if "model_name_or_path" not in model_kw:
        raise RecipeError(f"{where}: missing key 'model_name_or_path' (a local model directory or hub name).")
    if "output_dir" not in train_kw:
        raise RecipeError(f"{where}: missing key 'output_dir' (where checkpoints and the final model go).")
    if recipe_kw.get("dataset_name") is None:
        raise RecipeError(f"{where}: missing key 'dataset_name' (a local data file/directory or hub name).")
    recipe_args, model_args, training_args = build_arguments(recipe_kw, model_kw, train_kw, config_cls, where)
    return Recipe(path=path, raw=raw, recipe_args=recipe_args, model_args=model_args, training_args=training_args)


def build_arguments(recipe_kw: dict[str, Any], model_kw: dict[str, Any], train_kw: dict[str, Any],
                    config_cls: type, where: str) -> tuple[RecipeArguments, ModelConfig, Any]:
    """This machine's defaults (no reporting, precision, quiet CPU settings), then the three argument
    dataclasses of a recipe; a value TRL's own checks refuse is one error naming the recipe."""
    train_kw.setdefault("report_to", "none")
    default_precision_for_this_machine(train_kw)
    quiet_defaults_for_this_machine(train_kw, config_cls)
    try:
        return RecipeArguments(**recipe_kw), ModelConfig(**model_kw), config_cls(**train_kw)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: invalid combination of values: {exc}") from exc
