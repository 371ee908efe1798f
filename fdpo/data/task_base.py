"""The interface of a synthetic task: prompts, a strict verifier, and answer generators.

A synthetic task (see `fdpo.data.tasks` for the registry) is a family of prompts with MANY valid
answers each and an exact programmatic checker, so pass@k and answer diversity are meaningful.
Each task supplies:

- its prompts, split into train and held-out eval prompts by construction (`prompts(split)`);
- `check(record, completion)`: the verifier, reading only the record's `verifier_fields`;
- `normalize(completion)`: the canonical form of a well-formed answer (for counting distinct
  answers), or None when the completion is malformed;
- generators of correct answers (SFT, chosen), wrong answers (negatives) and minimally perturbed
  wrong answers (preference rejected side, with the decisive character spans).

A record is a plain dict: `{"prompt": str, "difficulty": int, <verifier fields>...}`; the JSONL
writer wraps `prompt` into a conversational message list.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from fdpo.errors import RecipeError

Split = Literal["train", "eval"]
Record = dict[str, Any]


def decisive_spans(chosen: str, rejected: str) -> tuple[list[list[int]], list[list[int]]]:
    """The minimal character spans where `chosen` and `rejected` differ, as `[start, end)` lists.

    Strips the longest common prefix and then the longest common suffix (not overlapping the
    prefix); what is left in each string is its decisive span. Identical strings give no spans.
    Outside its span each string equals the other: `chosen[:s] == rejected[:s]` and
    `chosen[e_c:] == rejected[e_r:]`.
    """
    if chosen == rejected:
        return [], []
    prefix = 0
    while prefix < min(len(chosen), len(rejected)) and chosen[prefix] == rejected[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < min(len(chosen), len(rejected)) - prefix
        and chosen[len(chosen) - 1 - suffix] == rejected[len(rejected) - 1 - suffix]
    ):
        suffix += 1
    return [[prefix, len(chosen) - suffix]], [[prefix, len(rejected) - suffix]]


class Task(ABC):
    """A synthetic task with a verifier; subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    verifier_fields: ClassVar[tuple[str, ...]]
    #: generation budget that comfortably fits any well-formed answer plus the end token
    max_new_tokens: ClassVar[int] = 16

    @abstractmethod
    def prompts(self, split: Split) -> list[Record]:
        """Every prompt record of `split`, in a fixed order that does not depend on any seed."""

    @abstractmethod
    def normalize(self, completion: str) -> str | None:
        """Canonical form of a well-formed answer (whatever its truth), None if malformed."""

    @abstractmethod
    def check(self, record: Record, completion: str) -> bool:
        """True iff `completion` is a well-formed, correct answer to `record`."""

    @abstractmethod
    def correct_answer(self, record: Record, rng: random.Random) -> str:
        """A correct answer drawn uniformly from all correct answers."""

    @abstractmethod
    def wrong_answer(self, record: Record, rng: random.Random) -> str:
        """A well-formed but wrong, plausible answer."""

    @abstractmethod
    def perturb(self, record: Record, answer: str, rng: random.Random) -> str:
        """A wrong answer that differs from the correct `answer` in a few decisive characters."""

    @abstractmethod
    def num_answers(self, record: Record) -> int:
        """How many distinct correct answers `record` has."""

    def ood_prompts(self) -> list[Record]:
        """Out-of-distribution eval prompts (e.g. larger numbers than any training prompt); optional."""
        raise RecipeError(f"task {self.name!r} has no out-of-distribution split ('ood'); evaluate split 'eval'.")

    def verifier_values(self, record: Record) -> dict[str, Any]:
        """The fields the verifier reads (what RL and eval rows carry besides the prompt)."""
        return {field: record[field] for field in self.verifier_fields}

    def corpus(self) -> Iterator[str]:
        """Text the tokenizer is trained on: every prompt and a spread of answers (deterministic)."""
        rng = random.Random(0)
        for split in ("train", "eval"):
            for record in self.prompts(split):
                yield record["prompt"]
                for _ in range(4):
                    yield self.correct_answer(record, rng)
                yield self.wrong_answer(record, rng)
