"""Rewards of the synthetic tasks: 1.0 when the task's checker accepts the completion, else 0.0.

The verifier fields (e.g. `target` for sum_pairs) come from the dataset's extra columns, which
TRL's GRPOTrainer passes to every reward function as keyword lists (one value per completion).
"""

from __future__ import annotations

from typing import Any

from fdpo.data.tasks import get_task
from fdpo.rewards.text import column, completion_text


class TaskReward:
    """The reward of one synthetic task; `__name__` is the task name (what TRL logs it as).

    A module-level class rather than a closure, so the reward pickles (e.g. across processes).
    """

    def __init__(self, task_name: str) -> None:
        self.task = get_task(task_name)
        self.__name__ = self.task.name
        self.__doc__ = f"1.0 if the `{self.task.name}` checker accepts the completion, else 0.0."

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        n = len(completions)
        fields = {f: column(kwargs, (f,), self.task.name, n) for f in self.task.verifier_fields}
        return [
            float(self.task.check({f: values[i] for f, values in fields.items()}, completion_text(c)))
            for i, c in enumerate(completions)
        ]

    def __repr__(self) -> str:
        return f"TaskReward({self.task.name!r})"


def synthetic_task(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Per-row dispatch on the `task` column: each completion is checked by its own row's task."""
    n = len(completions)
    tasks = column(kwargs, ("task",), "synthetic_task", n)
    rows = [{k: v[i] for k, v in kwargs.items() if isinstance(v, list) and len(v) == n} for i in range(n)]
    return [float(get_task(t).check(row, completion_text(c))) for t, row, c in zip(tasks, rows, completions)]
