"""Synthetic tasks: checkers against hand-written cases, data files in TRL's formats, determinism, splits."""

from __future__ import annotations

import json
import random

import pytest
from trl.data_utils import is_conversational

from fdpo.data.between import BetweenTask
from fdpo.data.sum_pairs import SumPairsTask, parse_sum_pair
from fdpo.data.task_base import decisive_spans
from fdpo.data.tasks import (
    FILE_NAMES,
    UnknownTaskError,
    available_tasks,
    check_completion,
    get_task,
    read_jsonl,
    write_task_data,
)
from fdpo.errors import RecipeError

SUM_CASES = [
    # (target, completion, correct)
    (12, "7+5", True),
    (12, "5+7", True),
    (12, "0+12", True),
    (12, "12+0", True),
    (0, "0+0", True),
    (12, " 7 + 5 ", True),
    (12, "7+5\n", True),
    (12, "\t7\t+\t5", True),
    (12, "7+6", False),  # wrong sum
    (12, "6+5", False),
    (12, "13+-1", False),  # negative
    (12, "-1+13", False),
    (12, "15-3", False),  # not a sum
    (12, "7+5.", False),  # trailing text
    (12, "7+5 is 12", False),
    (12, "7+5=12", False),
    (12, "7+5 7+5", False),
    (12, "The answer: 7+5", False),
    (12, "07+5", False),  # leading zero
    (12, "7+05", False),
    (12, "7.0+5", False),
    (12, "7+5+0", False),
    (12, "7 5", False),
    (12, "12", False),
    (12, "", False),
    (12, "+", False),
    (12, "7++5", False),
    (12, "７+5", False),  # full-width digit
    (12, "7+5<|end|>", False),
    (12, "1" * 40 + "+1", False),  # absurdly long number: malformed, no crash
]


@pytest.mark.parametrize(("target", "completion", "correct"), SUM_CASES)
def test_sum_pairs_checker(target, completion, correct):
    record = {"target": target}
    assert SumPairsTask().check(record, completion) is correct
    assert check_completion("sum_pairs", record, completion) is correct


def test_sum_pairs_normalize():
    task = SumPairsTask()
    assert task.normalize(" 7 +5\n") == "7+5"
    assert task.normalize("7+5.") is None
    assert parse_sum_pair("10+3") == (10, 3)


BETWEEN_CASES = [
    (12, 20, "15", True),
    (12, 20, "13", True),
    (12, 20, " 19\n", True),
    (12, 20, "12", False),  # bounds are excluded
    (12, 20, "20", False),
    (12, 20, "25", False),
    (12, 20, "-15", False),
    (12, 20, "15.", False),
    (12, 20, "015", False),
    (12, 20, "15 16", False),
    (12, 20, "fifteen", False),
    (12, 20, "", False),
]


@pytest.mark.parametrize(("low", "high", "completion", "correct"), BETWEEN_CASES)
def test_between_checker(low, high, completion, correct):
    assert check_completion("between", {"low": low, "high": high}, completion) is correct


def test_registry_and_unknown_task_error():
    assert {"sum_pairs", "between"} <= set(available_tasks())
    assert isinstance(get_task("sum_pairs"), SumPairsTask)
    with pytest.raises(UnknownTaskError, match=r"sum_pair.*registered tasks: between, sum_pairs.*'sum_pairs'"):
        get_task("sum_pair")
    assert issubclass(UnknownTaskError, RecipeError)
    with pytest.raises(KeyError, match="target"):
        check_completion("sum_pairs", {"answer": 3}, "1+2")


def test_answer_counts_are_many():
    task = SumPairsTask()
    for record in task.prompts("train") + task.prompts("eval"):
        n = record["target"]
        valid = [f"{a}+{n - a}" for a in range(n + 1)]
        assert task.num_answers(record) == len(set(valid)) == n + 1
        assert all(task.check(record, v) for v in valid)
        assert not task.check(record, f"{n + 1}+0")


@pytest.mark.parametrize("task", [SumPairsTask(), BetweenTask()])
def test_generators_respect_the_checker(task):
    rng = random.Random(0)
    for record in task.prompts("train")[:60]:
        correct = task.correct_answer(record, rng)
        assert task.check(record, correct)
        assert not task.check(record, task.wrong_answer(record, rng))
        rejected = task.perturb(record, correct, rng)
        assert task.normalize(rejected) is not None and not task.check(record, rejected)


def test_difficulty_levels():
    levels = {r["target"]: r["difficulty"] for r in SumPairsTask().prompts("train")}
    assert levels[0] == levels[9] == 1 and levels[10] == levels[19] == 2 and levels[20] == levels[30] == 3


@pytest.mark.parametrize("name", ["sum_pairs", "between"])
def test_train_and_eval_prompts_are_disjoint(name):
    task = get_task(name)
    train = {r["prompt"] for r in task.prompts("train")}
    held_out = {r["prompt"] for r in task.prompts("eval")}
    assert train and held_out and not train & held_out


def test_decisive_spans():
    assert decisive_spans("7+5", "7+6") == ([[2, 3]], [[2, 3]])
    assert decisive_spans("3+9", "3+10") == ([[2, 3]], [[2, 4]])
    assert decisive_spans("12+15", "9+15") == ([[0, 2]], [[0, 1]])
    assert decisive_spans("7+5", "7+5") == ([], [])


# ---------------------------------------------------------------- data files


def _rows(data_dir, kind):
    return read_jsonl(data_dir / FILE_NAMES[kind])


def _target_of(prompt_messages):
    """The target N of a sum_pairs prompt, looked up among all of the task's prompts."""
    text = prompt_messages[0]["content"]
    task = SumPairsTask()
    table = {r["prompt"]: r["target"] for r in task.prompts("train") + task.prompts("eval")}
    return table[text]


def test_manifest(task_data_dir):
    manifest = json.loads((task_data_dir / "manifest.json").read_text())
    assert manifest["task"] == "sum_pairs" and manifest["seed"] == 0
    assert set(manifest["files"]) == set(FILE_NAMES)
    for kind, name in manifest["files"].items():
        assert len(read_jsonl(task_data_dir / name)) == manifest["sizes"][kind] > 0


def test_sft_file_is_conversational_prompt_completion(task_data_dir):
    rows = _rows(task_data_dir, "sft")
    task = SumPairsTask()
    answers = set()
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        assert is_conversational(row)
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        text = row["completion"][0]["content"]
        assert task.check({"target": _target_of(row["prompt"])}, text)
        answers.add((row["prompt"][0]["content"], text))
    assert len(answers) > len(rows) // 4  # diverse correct answers, not one per prompt


def test_preference_file(task_data_dir):
    for kind in ("preference", "preference_eval"):
        rows = _rows(task_data_dir, kind)
        assert rows
        for row in rows:
            assert {"prompt", "chosen", "rejected", "chosen_decisive_spans", "rejected_decisive_spans"} <= set(row)
            assert is_conversational(row)
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            assert check_completion("sum_pairs", row, chosen)
            assert not check_completion("sum_pairs", row, rejected)
            assert row["target"] == _target_of(row["prompt"])
            [[cs, ce]], [[rs, re_]] = row["chosen_decisive_spans"], row["rejected_decisive_spans"]
            # identical outside the decisive spans, different inside, and the spans are short
            assert chosen[:cs] == rejected[:rs] and chosen[ce:] == rejected[re_:]
            assert chosen[cs:ce] != rejected[rs:re_]
            assert 1 <= ce - cs <= 2 and 1 <= re_ - rs <= 2


def test_negatives_file(task_data_dir):
    for row in _rows(task_data_dir, "negatives"):
        assert set(row) == {"prompt", "rejected"} and is_conversational(row)
        text = row["rejected"][0]["content"]
        record = {"target": _target_of(row["prompt"])}
        assert SumPairsTask().normalize(text) is not None and not SumPairsTask().check(record, text)


def test_rl_and_eval_files_carry_verifier_fields(task_data_dir):
    for kind in ("rl", "eval"):
        for row in _rows(task_data_dir, kind):
            assert {"prompt", "task", "target", "difficulty"} <= set(row) and "completion" not in row
            assert is_conversational(row)
            assert row["task"] == "sum_pairs" and row["target"] == _target_of(row["prompt"])


def test_data_files_train_eval_disjoint(task_data_dir):
    train = {r["prompt"][0]["content"] for k in ("sft", "preference", "negatives", "rl") for r in _rows(task_data_dir, k)}
    held_out = {r["prompt"][0]["content"] for k in ("eval", "preference_eval") for r in _rows(task_data_dir, k)}
    assert not train & held_out
    assert len({r["prompt"][0]["content"] for r in _rows(task_data_dir, "eval")}) == len(SumPairsTask().prompts("eval"))


def test_data_is_deterministic_for_a_seed(task_data_dir, tmp_path):
    again = write_task_data("sum_pairs", tmp_path / "again", seed=0)
    for kind, path in again.items():
        assert path.read_bytes() == (task_data_dir / path.name).read_bytes(), kind
    other = write_task_data("sum_pairs", tmp_path / "other", seed=1)
    assert other["sft"].read_bytes() != again["sft"].read_bytes()
    assert other["eval"].read_bytes() == again["eval"].read_bytes()  # eval prompts never depend on the seed


def test_sizes_override_and_bad_key(tmp_path):
    paths = write_task_data("between", tmp_path, seed=0, sizes={"sft": 5, "eval": 3})
    assert len(read_jsonl(paths["sft"])) == 5 and len(read_jsonl(paths["eval"])) == 3
    for row in read_jsonl(paths["preference"]):
        assert not check_completion("between", row, row["rejected"][0]["content"])
    with pytest.raises(ValueError, match="unknown size key"):
        write_task_data("sum_pairs", tmp_path, sizes={"sfft": 3})


def test_data_loads_with_datasets_and_trl_extracts_nothing_odd(task_data_dir):
    from datasets import load_dataset

    for kind in ("sft", "preference", "negatives", "rl", "eval"):
        ds = load_dataset("json", data_files=str(task_data_dir / FILE_NAMES[kind]), split="train")
        assert is_conversational(ds[0]), kind
