"""Completion text as TRL passes it to reward functions: a string, or a list of message dicts."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion.

    TRL's GRPOTrainer passes plain strings for standard data and, for conversational data, a list
    of messages (`[{"role": "assistant", "content": ...}]`); the text is the content of the last
    assistant message (or the last message). A message whose content is a list of parts
    (`[{"type": "text", "text": ...}]`) contributes its text parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, list | tuple):
        if not completion:
            return ""
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = (assistant or messages or [None])[-1]
        return "" if chosen is None else _content_text(chosen.get("content", ""))
    raise TypeError(f"reward: cannot read a completion of type {type(completion).__name__}: {completion!r:.100}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else str(content)


class MissingColumnError(KeyError):
    """A reward function's dataset column is absent from the batch."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def column(kwargs: dict[str, Any], names: tuple[str, ...], reward: str, n: int) -> list[Any]:
    """The first of the columns `names` present in `kwargs`, checked to have one value per completion."""
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            values = list(kwargs[name])
            if len(values) != n:
                raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
            return values
    raise MissingColumnError(
        f"reward {reward!r} needs a dataset column {' or '.join(repr(c) for c in names)}; "
        f"the batch has columns {sorted(k for k in kwargs if not k.startswith('_'))}"
    )
