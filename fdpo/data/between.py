"""`between`: "Write a number between L and H." — every integer x with L < x < H.

A prompt has H − L − 1 correct answers (the bounds are excluded). Answer format (strict): one
non-negative decimal integer without sign or leading zeros, surrounding whitespace tolerated, any
other text malformed (hence wrong).

Prompts: L in 0–30, gap H − L in 3–10, four phrasings. Difficulty by the number of correct
answers: 1 for ≥ 6, 2 for 3–5, 3 for 2. Train/eval split (by construction, independent of any
seed): (phrasing t, L, gap) is an eval prompt iff (L + gap + t) mod 4 == 0, so every phrasing, L
and gap occurs in training but no eval prompt string does.
"""

from __future__ import annotations

import random
import re

from fdpo.data.task_base import Record, Split, Task

TEMPLATES: tuple[str, ...] = (
    "Write a number between {lo} and {hi}.",
    "Give a number that is between {lo} and {hi}.",
    "Name a number larger than {lo} and smaller than {hi}.",
    "Which number lies between {lo} and {hi}?",
)

_ANSWER = re.compile(r"\s*(0|[1-9][0-9]{0,17})\s*", re.ASCII)


def parse_number(completion: str) -> int | None:
    """The integer if `completion` is exactly one non-negative integer, else None."""
    match = _ANSWER.fullmatch(completion)
    return None if match is None else int(match.group(1))


class BetweenTask(Task):
    """An integer strictly between L and H; H − L − 1 correct answers."""

    name = "between"
    description = "Write a number strictly between L and H (answer: one integer)."
    verifier_fields = ("low", "high")
    max_new_tokens = 8

    def prompts(self, split: Split) -> list[Record]:
        want_eval = split == "eval"
        out = []
        for lo in range(31):
            for gap in range(3, 11):
                count = gap - 1
                difficulty = 1 if count >= 6 else 2 if count >= 3 else 3
                for t, template in enumerate(TEMPLATES):
                    if ((lo + gap + t) % 4 == 0) == want_eval:
                        out.append(
                            {
                                "prompt": template.format(lo=lo, hi=lo + gap),
                                "low": lo,
                                "high": lo + gap,
                                "difficulty": difficulty,
                                "template": t,
                            }
                        )
        return out

    def normalize(self, completion: str) -> str | None:
        value = parse_number(completion)
        return None if value is None else str(value)

    def check(self, record: Record, completion: str) -> bool:
        value = parse_number(completion)
        return value is not None and int(record["low"]) < value < int(record["high"])

    def num_answers(self, record: Record) -> int:
        return max(0, int(record["high"]) - int(record["low"]) - 1)

    def correct_answer(self, record: Record, rng: random.Random) -> str:
        return str(rng.randint(int(record["low"]) + 1, int(record["high"]) - 1))

    def wrong_answer(self, record: Record, rng: random.Random) -> str:
        lo, hi = int(record["low"]), int(record["high"])
        choices = [x for x in (lo - 2, lo - 1, lo, hi, hi + 1, hi + 2) if x >= 0]
        return str(rng.choice(choices))

    def perturb(self, record: Record, answer: str, rng: random.Random) -> str:
        """Change one digit so the number leaves (L, H): e.g. `15` → `25` for (12, 20)."""
        value = parse_number(answer)
        if value is None:
            raise ValueError(f"between: cannot perturb malformed answer {answer!r}")
        text = str(value)
        candidates = []
        for i, old in enumerate(text):
            for digit in "0123456789":
                new = text[:i] + digit + text[i + 1 :]
                if digit != old and (len(new) == 1 or new[0] != "0") and not self.check(record, new):
                    candidates.append(new)
        return rng.choice(candidates) if candidates else str(record["high"])
