"""`sum_pairs`: "Write two numbers that add up to N." — every `a+b` with a, b ≥ 0 and a + b = N.

A prompt with target N has N + 1 correct answers (ordered pairs: `3+4` and `4+3` are different
answers), so pass@k and the number of distinct correct answers are meaningful.

Answer format (strict): `<a>+<b>` where a and b are non-negative decimal integers written without
sign or leading zeros (`0` itself is allowed), e.g. `12+15`. Whitespace (spaces, tabs, newlines)
around the whole answer and around the `+` is tolerated; ANY other text — a trailing period, a
second answer, words, `=27` — makes the completion malformed, and a malformed completion is wrong.

Difficulty levels by N: 1 for N in 0–9, 2 for 10–19, 3 for 20–`max_n` (30 by default). A tiny
model learns the single-digit level first; larger N need a real subtraction table.

Train/eval split (held out by construction, independent of any seed): there are six phrasings;
for each N the phrasings `N mod 6` and `(N + 3) mod 6` are the eval prompts and the other four
are the train prompts. Every N and every phrasing occurs in training, but no eval prompt string
(phrasing, N) does; with `max_n=30` that is 124 train and 62 eval prompts.

Out-of-distribution split (`ood_prompts`, `fdpo eval --split ood`): targets N = max_n + 1 … max_n + 10,
larger than any training target, in all six phrasings (difficulty 4; 60 prompts with `max_n=30`).
It is not used by any data file: only evaluations read it (held-out retention, as DPH-RL measures).
"""

from __future__ import annotations

import random
import re

from fdpo.data.task_base import Record, Split, Task

TEMPLATES: tuple[str, ...] = (
    "Write two numbers that add up to {n}.",
    "Give two numbers whose sum is {n}.",
    "Find two numbers that sum to {n}.",
    "Name two numbers adding up to {n}.",
    "Which two numbers add up to {n}?",
    "Split {n} into two numbers.",
)

_NUMBER = r"(0|[1-9][0-9]{0,17})"
_ANSWER = re.compile(rf"\s*{_NUMBER}\s*\+\s*{_NUMBER}\s*", re.ASCII)


def parse_sum_pair(completion: str) -> tuple[int, int] | None:
    """`(a, b)` if `completion` is exactly `a+b` (see the module docstring), else None."""
    match = _ANSWER.fullmatch(completion)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def difficulty_of(n: int) -> int:
    """Difficulty level of target `n`: 1 (0–9), 2 (10–19), 3 (20 and above)."""
    return 1 if n < 10 else 2 if n < 20 else 3


class SumPairsTask(Task):
    """Two non-negative integers that add up to N; N + 1 correct answers."""

    name = "sum_pairs"
    description = "Write two numbers that add up to N (answer 'a+b', a, b >= 0)."
    verifier_fields = ("target",)
    max_new_tokens = 16

    def __init__(self, max_n: int = 30) -> None:
        if max_n < 5:
            raise ValueError(f"sum_pairs: max_n must be at least 5, got {max_n}")
        self.max_n = max_n

    @staticmethod
    def is_eval(template_index: int, n: int) -> bool:
        """Whether (phrasing, N) is a held-out eval prompt."""
        return template_index in (n % len(TEMPLATES), (n + 3) % len(TEMPLATES))

    def prompts(self, split: Split) -> list[Record]:
        want_eval = split == "eval"
        return [
            {"prompt": template.format(n=n), "target": n, "difficulty": difficulty_of(n), "template": t}
            for n in range(self.max_n + 1)
            for t, template in enumerate(TEMPLATES)
            if self.is_eval(t, n) == want_eval
        ]

    def ood_prompts(self) -> list[Record]:
        return [
            {"prompt": template.format(n=n), "target": n, "difficulty": 4, "template": t}
            for n in range(self.max_n + 1, self.max_n + 11)
            for t, template in enumerate(TEMPLATES)
        ]

    def normalize(self, completion: str) -> str | None:
        pair = parse_sum_pair(completion)
        return None if pair is None else f"{pair[0]}+{pair[1]}"

    def check(self, record: Record, completion: str) -> bool:
        pair = parse_sum_pair(completion)
        return pair is not None and pair[0] + pair[1] == int(record["target"])

    def num_answers(self, record: Record) -> int:
        return int(record["target"]) + 1

    def correct_answer(self, record: Record, rng: random.Random) -> str:
        n = int(record["target"])
        a = rng.randint(0, n)
        return f"{a}+{n - a}"

    def wrong_answer(self, record: Record, rng: random.Random) -> str:
        return self.perturb(record, self.correct_answer(record, rng), rng)

    def perturb(self, record: Record, answer: str, rng: random.Random) -> str:
        """Change one of the two numbers by 1–3 (staying ≥ 0): e.g. `7+5` → `7+6` or `5+5`."""
        pair = parse_sum_pair(answer)
        if pair is None:
            raise ValueError(f"sum_pairs: cannot perturb malformed answer {answer!r}")
        side = rng.randrange(2)
        value = pair[side]
        deltas = [d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
        new = value + rng.choice(deltas)
        a, b = (new, pair[1]) if side == 0 else (pair[0], new)
        return f"{a}+{b}"
