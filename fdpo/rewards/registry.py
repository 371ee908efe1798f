"""Resolving a reward named in a recipe: a registered name or a user function by dotted path.

`get_reward_function("sum_pairs")` → the synthetic task's checker; `"math_verify"`, `"exact_match"`,
`"synthetic_task"` (per-row dispatch on a `task` column) are built in. Anything else is read as a
dotted path to a user function, `package.module:function` or `package.module.function`; the module
is imported (installed, on `PYTHONPATH`, or a `module.py` in the working directory, loaded explicitly by
file path, never by putting the working directory on `sys.path`, so it cannot shadow fdpo's own imports).
A recipe is trusted like code: a dotted path imports and calls arbitrary code. Every reward follows TRL's
signature `fn(prompts, completions, **kwargs) -> list[float]`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from fdpo.data.tasks import available_tasks
from fdpo.errors import RecipeError, nearest
from fdpo.rewards.exact import exact_match
from fdpo.rewards.math_reward import math_verify
from fdpo.rewards.tasks import TaskReward, synthetic_task

RewardFn = Callable[..., list[float]]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math_verify": math_verify,
    "synthetic_task": synthetic_task,
}


class RewardSpecError(RecipeError):
    """A reward spec that names no built-in reward and no importable function."""


def available_rewards() -> list[str]:
    """Names `get_reward_function` resolves without a dotted path (built-ins and synthetic tasks)."""
    return sorted({*BUILTIN_REWARDS, *available_tasks()})


def get_reward_function(spec: str | RewardFn) -> RewardFn:
    """The reward function named by `spec` (a callable is returned unchanged)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec in available_tasks():
        return TaskReward(spec)
    if ":" not in spec and "." not in spec:
        hint = nearest(spec, available_rewards())
        raise RewardSpecError(
            f"unknown reward {spec!r}; built-in rewards: {', '.join(available_rewards())}"
            + (f". Did you mean {hint!r}?" if hint else "")
            + ". A user function is named by dotted path, e.g. 'my_pkg.rewards:my_reward'."
        )
    return _import_function(spec)


def _import_user_module(module_name: str):
    """Import `module_name`; if no installed module has that name, load `./module_name.py` by its path."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        local = Path.cwd() / (module_name.replace(".", "/") + ".py")
        if exc.name != module_name.split(".")[0] or not local.is_file():
            raise
    spec = importlib.util.spec_from_file_location(module_name, local)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _import_function(spec: str) -> RewardFn:
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr or (sep == ":" and ":" in attr):
        raise RewardSpecError(f"reward {spec!r}: expected 'package.module:function' or 'package.module.function'")
    try:
        module = _import_user_module(module_name)
    except ImportError as exc:
        raise RewardSpecError(
            f"reward {spec!r}: could not import module {module_name!r} ({exc}). "
            "Install it or put its directory on PYTHONPATH."
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            hint = nearest(part, public)
            raise RewardSpecError(
                f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}"
                + (f". Did you mean {hint!r}?" if hint else "")
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(f"reward {spec!r}: {attr!r} in {module_name!r} is not callable")
    return obj
