"""Evaluation: pass@k against brute-force enumeration, distinct-n by hand, evaluate_checkpoint end to end."""

from __future__ import annotations

import io
import itertools
import json
import math

import pytest

from fdpo.eval import distinct_correct, distinct_n, evaluate_checkpoint, pass_at_k, render_eval_table


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that contain at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_stability():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n where the binomials overflow floats: compare with exact integer arithmetic
    n, c, k = 2000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(seqs, 1) == pytest.approx(4 / 6)  # {1,2,3,4} of 6 unigrams
    assert distinct_n(seqs, 2) == pytest.approx(3 / 4)  # {12, 23, 24} of 4 bigrams
    assert distinct_n([[1], []], 2) == 0.0
    assert distinct_n([list("aaaa")], 1) == 0.25


def test_distinct_correct():
    assert distinct_correct(["3+4", "3+4", "4+3", "9+9", None], [True, True, True, False, False]) == 2


def test_evaluate_untrained_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate_checkpoint(
        str(tiny_model_dir), task="sum_pairs", ks=(1, 4), num_samples=4, num_prompts=6, max_new_tokens=8,
        out_json=out,
    )
    assert set(result["pass_at_k"]) == {"1", "4"}
    for value in [*result["pass_at_k"].values(), result["mean_reward"], result["greedy_accuracy"],
                  result["answer_coverage"], result["distinct_1"], result["distinct_2"], result["finished_rate"]]:
        assert 0.0 <= value <= 1.0
    assert result["pass_at_k"]["1"] <= result["pass_at_k"]["4"]
    assert result["pass_at_k"]["1"] == pytest.approx(result["mean_reward"])
    assert 0.0 <= result["distinct_correct"] <= 4
    assert result["distinct_1"] > 0  # an untrained model babbles: many distinct tokens
    assert result["settings"]["num_prompts"] == 6 and result["settings"]["num_samples"] == 4
    assert sum(v["num_prompts"] for v in result["by_difficulty"].values()) == 6
    assert json.loads(out.read_text())["pass_at_k"] == result["pass_at_k"]

    buf = io.StringIO()
    from rich.console import Console

    render_eval_table(result, console=Console(file=buf, width=120))
    assert "pass@4" in buf.getvalue() and "distinct-2" in buf.getvalue()


def test_evaluate_is_seeded_and_reads_a_data_file(tiny_model_dir, task_data_dir):
    kwargs = {"ks": (1,), "num_samples": 2, "num_prompts": 4, "max_new_tokens": 6, "out_json": False, "greedy": False}
    a = evaluate_checkpoint(tiny_model_dir, data_file=task_data_dir / "eval.jsonl", seed=1, **kwargs)
    b = evaluate_checkpoint(tiny_model_dir, seed=1, **kwargs)
    assert a["examples"] == b["examples"]  # the eval file holds the task's default held-out prompts
    assert "greedy_accuracy" not in a


def test_evaluate_rejects_too_few_samples(tiny_model_dir):
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_checkpoint(tiny_model_dir, ks=(1, 16), num_samples=8, out_json=False)
