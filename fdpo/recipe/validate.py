"""Type checking of recipe values against dataclass field annotations.

TRL's `TrlParser` / `HfArgumentParser.parse_dict` lets some bad values through (a float for an int
field, an unknown enum value, a list for a scalar). fdpo checks every value itself, before anything
is built, and names the key and the recipe file in the error.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from fdpo.errors import RecipeError, nearest


def _type_name(tp: Any) -> str:
    friendly = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if tp in friendly:
        return friendly[tp]
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _choices_of(field: dataclasses.Field) -> list[Any] | None:
    choices = field.metadata.get("choices") if field.metadata else None
    if choices is None:
        return None
    return list(choices)


def check_value(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Check `value` against annotation `tp`.

    Returns (ok, coerced_value, reason). The only coercions are the lossless ones a YAML user
    expects: an int where a float is wanted, and an Enum's string value.
    """
    if tp is Any or tp is typing.Any:
        return True, value, ""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        reasons = []
        members = typing.get_args(tp)
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and isinstance(value, str):
            # `SchedulerType | str` in transformers means "a SchedulerType, possibly given by its value"
            return check_value(value, enums[0])
        # try exact (non-coercing) matches first so `int | str` keeps a str a str
        for member in members:
            ok, coerced, reason = check_value(value, member)
            if ok:
                return True, coerced, ""
            reasons.append(reason)
        return False, value, f"expected {' or '.join(_type_name(m) for m in members)}"
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return True, value, ""
        return False, value, f"expected one of {list(allowed)}"
    if tp is type(None):
        return (value is None), value, "expected null"
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, list | tuple):
            # TRL's own parsers accept one item for a list field (`loss_type: sigmoid` → ["sigmoid"])
            (inner,) = typing.get_args(tp)[:1] or (Any,)
            ok, coerced, _ = check_value(value, inner)
            if ok and value is not None and not isinstance(value, dict):
                return True, [coerced], ""
            return False, value, f"expected a list, got {type(value).__name__}"
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        out = []
        for i, item in enumerate(value):
            ok, coerced, reason = check_value(item, inner)
            if not ok:
                return False, value, f"item {i}: {reason}"
            out.append(coerced)
        return True, out, ""
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False, value, f"expected a mapping, got {type(value).__name__}"
        return True, value, ""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if isinstance(value, tp):
            return True, value, ""
        if value in values:
            return True, value, ""
        hint = nearest(str(value), [str(v) for v in values])
        extra = f" (did you mean {hint!r}?)" if hint else ""
        return False, value, f"expected one of {values}{extra}"
    if tp is bool:
        return isinstance(value, bool), value, f"expected true/false, got {value!r}"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value, f"expected an integer, got {value!r}"
    if tp is float:
        if isinstance(value, bool):
            return False, value, f"expected a number, got {value!r}"
        if isinstance(value, int | float):
            return True, float(value), ""
        return False, value, f"expected a number, got {value!r}"
    if tp is str:
        return isinstance(value, str), value, f"expected a string, got {type(value).__name__} {value!r}"
    if isinstance(tp, type):
        return isinstance(value, tp), value, f"expected {tp.__name__}"
    return True, value, ""  # unknown annotation form: let the dataclass decide


def check_field(field: dataclasses.Field, value: Any, *, where: str) -> Any:
    """Validate one recipe value for dataclass field `field`; return the coerced value."""
    ok, coerced, reason = check_value(value, field.type)
    if not ok:
        raise RecipeError(f"{where}: key '{field.name}' has a bad value {value!r}: {reason}.")
    choices = _choices_of(field)
    if choices is not None and coerced is not None:
        items = coerced if isinstance(coerced, list) else [coerced]
        for item in items:
            if item not in choices:
                hint = nearest(str(item), [str(c) for c in choices])
                extra = f" Did you mean {hint!r}?" if hint else ""
                raise RecipeError(
                    f"{where}: key '{field.name}' is {item!r}, which is not one of {choices}.{extra}"
                )
    return coerced


def _at_least(bound: float, *, strict: bool = False):
    def check(value: Any) -> bool:
        return value > bound if strict else value >= bound

    return check


# Values that type-check but cannot mean anything (TRL/transformers accept several of them silently and
# then train nothing, or crash later). `None` is always allowed where a key is optional.
RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (_at_least(0, strict=True), "must be > 0 (e.g. 1e-5 for a 0.5B model, 1e-3 for the tiny one)"),
    "per_device_train_batch_size": (_at_least(1), "must be ≥ 1"),
    "per_device_eval_batch_size": (_at_least(1), "must be ≥ 1"),
    "gradient_accumulation_steps": (_at_least(1), "must be ≥ 1 (1 means no accumulation)"),
    "max_steps": (lambda v: v >= 1 or v == -1, "must be ≥ 1, or -1 to train for num_train_epochs"),
    "num_train_epochs": (_at_least(0, strict=True), "must be > 0"),
    "save_steps": (_at_least(0, strict=True), "must be > 0 (a step count, or a fraction of max_steps below 1)"),
    "logging_steps": (_at_least(0, strict=True), "must be > 0 (a step count, or a fraction of max_steps below 1)"),
    "eval_steps": (_at_least(0, strict=True), "must be > 0 (a step count, or a fraction of max_steps below 1)"),
    "save_total_limit": (_at_least(1), "must be ≥ 1 (or null to keep every checkpoint)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "warmup_steps": (_at_least(0), "must be ≥ 0"),
    "weight_decay": (_at_least(0), "must be ≥ 0"),
    "max_grad_norm": (_at_least(0), "must be ≥ 0 (0 turns clipping off)"),
    "max_length": (_at_least(1), "must be ≥ 1 (or null for no limit)"),
    "max_prompt_length": (_at_least(1), "must be ≥ 1 (or null for no limit)"),
    "max_completion_length": (_at_least(1), "must be ≥ 1"),
    "num_generations": (_at_least(1), "must be ≥ 1"),
    "temperature": (_at_least(0, strict=True), "must be > 0 (sampling temperature)"),
    "cpu_threads": (_at_least(1), "must be ≥ 1 (or null for torch's default)"),
    "seed": (_at_least(0), "must be ≥ 0"),
}


def check_ranges(raw: dict[str, Any], *, where: str, origins: dict[str, str] | None = None) -> None:
    """Refuse type-correct values that cannot mean anything (the table `RANGES`), naming key and origin."""
    origins = origins or {}
    for key, (ok, rule) in RANGES.items():
        value = raw.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not ok(value) or value != value:  # value != value: NaN
            raise RecipeError(f"{origins.get(key, where)}: key '{key}' is {value!r}: {rule}.")
