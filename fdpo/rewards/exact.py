"""`exact_match`: 1.0 when the completion equals the reference answer after whitespace normalisation."""

from __future__ import annotations

from typing import Any

from fdpo.rewards.text import column, completion_text


def normalize_whitespace(text: str) -> str:
    """Strip the ends and collapse every run of whitespace into one space."""
    return " ".join(str(text).split())


def exact_match(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 iff the completion text equals the `answer` column (whitespace-normalised, case-sensitive).

    An `answer` value may also be a list of acceptable answers.
    """
    answers = column(kwargs, ("answer",), "exact_match", len(completions))
    out = []
    for completion, answer in zip(completions, answers):
        got = normalize_whitespace(completion_text(completion))
        accepted = answer if isinstance(answer, list | tuple) else [answer]
        out.append(float(any(got == normalize_whitespace(a) for a in accepted)))
    return out
