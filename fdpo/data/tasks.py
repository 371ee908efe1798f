"""Synthetic tasks of the embedded default: registry, verifier entry point and data writer.

`get_task(name)` returns a `fdpo.data.task_base.Task`; `check_completion(task, record, text)`
verifies one completion; `write_task_data(task, out_dir, seed)` writes the data of every training
stage as JSONL in TRL's formats (all conversational; each prompt is `[{"role": "user", ...}]`):

| file                    | columns                                                        | used by        |
|-------------------------|----------------------------------------------------------------|----------------|
| `sft.jsonl`             | prompt, completion (assistant message list; diverse correct)   | SFTTrainer     |
| `preference.jsonl`      | prompt, chosen, rejected, chosen_decisive_spans,               | DPOTrainer     |
|                         | rejected_decisive_spans, task, <verifier fields>               |                |
| `preference_eval.jsonl` | same as preference.jsonl, on the held-out eval prompts         | DPO eval       |
| `negatives.jsonl`       | prompt, rejected (wrong answers only)                          | D2O            |
| `rl.jsonl`              | prompt, task, <verifier fields>, difficulty                    | GRPOTrainer    |
| `eval.jsonl`            | prompt, task, <verifier fields>, difficulty (held-out prompts) | `fdpo eval`    |
| `manifest.json`         | task, seed, sizes, file names, split description               | pipeline       |

Preference pairs: `rejected` is the `chosen` answer with a few characters changed so it is wrong
(e.g. chosen `7+5`, rejected `7+6`); `*_decisive_spans` are `[start, end)` character spans inside
each side's message content outside of which chosen and rejected are identical (what a SparsePO
mask should find; the tiny tokenizer splits digits into single tokens, so spans map onto tokens).

Train files (sft, preference, negatives, rl) use only the task's train prompts; eval files only
its held-out prompts (see each task's module for how they are held out). Everything is a pure
function of (task, seed, sizes): the same arguments write byte-identical files. The eval prompts
do not depend on the seed at all (their order is a fixed shuffle), so evaluations are comparable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fdpo.data.between import BetweenTask
from fdpo.data.sum_pairs import SumPairsTask
from fdpo.data.task_base import Record, Task, decisive_spans
from fdpo.errors import RecipeError, nearest

TASKS: dict[str, Callable[[], Task]] = {
    "sum_pairs": SumPairsTask,
    "between": BetweenTask,
}

DEFAULT_SIZES: dict[str, int | None] = {
    "sft": 4000,
    "preference": 2000,
    "preference_eval": 256,
    "negatives": 1000,
    "rl": 512,
    "eval": None,  # None: every held-out prompt once
}
FILE_NAMES: dict[str, str] = {kind: f"{kind}.jsonl" for kind in DEFAULT_SIZES}
MANIFEST = "manifest.json"
EVAL_ORDER_SEED = 1234  # fixed: the eval prompts and their order never depend on the data seed


class UnknownTaskError(RecipeError):
    """A task name that is not registered; the message lists the registered ones."""


def available_tasks() -> list[str]:
    """Names of the registered synthetic tasks."""
    return sorted(TASKS)


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Register a new synthetic task under `name` (a `Task` subclass or a zero-argument factory)."""
    TASKS[name] = factory


def get_task(name: str | Task) -> Task:
    """The task registered as `name` (a `Task` instance is returned unchanged)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        hint = nearest(str(name), TASKS)
        raise UnknownTaskError(
            f"unknown task {name!r}; registered tasks: {', '.join(available_tasks())}."
            + (f" Did you mean {hint!r}?" if hint else "")
        )
    return TASKS[name]()


def check_completion(task: str | Task, record: Mapping[str, Any], completion_text: str) -> bool:
    """Whether `completion_text` correctly answers `record` (a row carrying the task's verifier fields)."""
    task_obj = get_task(task)
    missing = [f for f in task_obj.verifier_fields if f not in record]
    if missing:
        raise KeyError(f"{task_obj.name}: record lacks verifier field(s) {missing}; it has {sorted(record)}")
    return task_obj.check(dict(record), completion_text)


def user_prompt(text: str) -> list[dict[str, str]]:
    """A conversational prompt: one user message."""
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    """A conversational completion: one assistant message."""
    return [{"role": "assistant", "content": text}]


def eval_records(task: str | Task, split: str = "eval") -> list[Record]:
    """The task's held-out prompts of `split` ("eval", or "ood" where the task has one) in a fixed shuffled order."""
    task_obj = get_task(task)
    if split not in ("eval", "ood"):
        raise RecipeError(f"{task_obj.name}: evaluation split must be 'eval' or 'ood', got {split!r}.")
    records = task_obj.prompts("eval") if split == "eval" else task_obj.ood_prompts()
    random.Random(EVAL_ORDER_SEED).shuffle(records)
    return records


def _verifier_row(task: Task, record: Record) -> dict[str, Any]:
    return {
        "prompt": user_prompt(record["prompt"]),
        "task": task.name,
        **task.verifier_values(record),
        "difficulty": record["difficulty"],
    }


def _preference_row(task: Task, record: Record, rng: random.Random) -> dict[str, Any]:
    chosen = task.correct_answer(record, rng)
    rejected = task.perturb(record, chosen, rng)
    chosen_spans, rejected_spans = decisive_spans(chosen, rejected)
    return {
        "prompt": user_prompt(record["prompt"]),
        "chosen": assistant(chosen),
        "rejected": assistant(rejected),
        "chosen_decisive_spans": chosen_spans,
        "rejected_decisive_spans": rejected_spans,
        "task": task.name,
        **task.verifier_values(record),
    }


def build_rows(task: str | Task, kind: str, seed: int = 0, size: int | None = None) -> list[dict[str, Any]]:
    """The rows of one data file (`kind` in `FILE_NAMES`), deterministic in (task, kind, seed, size)."""
    task_obj = get_task(task)
    if kind not in FILE_NAMES:
        raise ValueError(f"unknown data kind {kind!r}; kinds: {list(FILE_NAMES)}")
    size = DEFAULT_SIZES[kind] if size is None else size
    rng = random.Random(f"{task_obj.name}/{kind}/{seed}")
    if kind == "eval":
        records = eval_records(task_obj)
        return [_verifier_row(task_obj, r) for r in records[: size if size is not None else len(records)]]
    pool = task_obj.prompts("eval" if kind == "preference_eval" else "train")
    picks = [rng.choice(pool) for _ in range(int(size or 0))]
    if kind == "sft":
        return [
            {"prompt": user_prompt(r["prompt"]), "completion": assistant(task_obj.correct_answer(r, rng))}
            for r in picks
        ]
    if kind in ("preference", "preference_eval"):
        return [_preference_row(task_obj, r, rng) for r in picks]
    if kind == "negatives":
        return [
            {"prompt": user_prompt(r["prompt"]), "rejected": assistant(task_obj.wrong_answer(r, rng))}
            for r in picks
        ]
    return [_verifier_row(task_obj, r) for r in picks]  # rl


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write `rows` as JSON lines (UTF-8, one object per line, key order kept)."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (blank lines skipped); errors name the file and line."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def write_task_data(
    task: str, out_dir: str | Path, seed: int = 0, sizes: Mapping[str, int | None] | None = None
) -> dict[str, Path]:
    """Write every stage's data for `task` into `out_dir`; returns {kind: path} (plus "manifest").

    `sizes` overrides row counts per kind (keys of `DEFAULT_SIZES`; `eval: None` means all held-out
    prompts). The manifest is written last, so its presence marks a complete data directory.
    """
    task_obj = get_task(task)
    unknown = sorted(set(sizes or {}) - set(DEFAULT_SIZES))
    if unknown:
        raise ValueError(f"write_task_data: unknown size key(s) {unknown}; valid: {list(DEFAULT_SIZES)}")
    resolved = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for kind, name in FILE_NAMES.items():
        rows = build_rows(task_obj, kind, seed=seed, size=resolved[kind])
        paths[kind] = out / name
        write_jsonl(paths[kind], rows)
        counts[kind] = len(rows)
    manifest = {
        "task": task_obj.name,
        "description": task_obj.description,
        "seed": seed,
        "sizes": counts,
        "files": dict(FILE_NAMES),
        "verifier_fields": list(task_obj.verifier_fields),
        "num_train_prompts": len(task_obj.prompts("train")),
        "num_eval_prompts": len(task_obj.prompts("eval")),
        "split": "train files use the task's train prompts, eval files its held-out prompts (disjoint)",
    }
    paths["manifest"] = out / MANIFEST
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
