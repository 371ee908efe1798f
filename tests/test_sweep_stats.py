"""pass@k curves and bootstrap intervals of `fdpo sweep` reports against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from fdpo.eval.intervals import BootstrapDraws, bootstrap_curve, bootstrap_mean, paired_difference
from fdpo.eval.metrics import answer_entropy, pass_at_k_curve


def _brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of the k-subsets of the n samples that contain a correct one (the estimator's definition)."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 3, 6, 9])
def test_pass_at_k_curve_is_the_brute_force_estimator(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        curve = pass_at_k_curve(n, c)
        assert len(curve) == n
        for k, value in enumerate(curve, start=1):
            assert value == pytest.approx(_brute_pass_at_k(outcomes, k), abs=1e-12), (n, c, k)


def test_answer_entropy_by_hand():
    assert answer_entropy(["1+2", "1+2", "2+1", None], [True, True, True, False]) == pytest.approx(
        -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    )
    assert answer_entropy(["a", "b"], [False, False]) == 0.0
    assert answer_entropy(list("abcd"), [True] * 4) == pytest.approx(math.log(4))


def test_one_seed_interval_equals_scipy_bootstrap_on_the_same_resamples():
    rng = np.random.default_rng(7)
    x = rng.beta(2.0, 3.0, size=37)
    draws = BootstrapDraws.draw(1, x.size, num_resamples=999, seed=11)
    ours = bootstrap_mean(x[None, :], draws)
    ref = stats.bootstrap((x,), np.mean, n_resamples=999, method="percentile", confidence_level=0.95,
                          vectorized=True, rng=np.random.default_rng(11))
    assert ours.mean == pytest.approx(x.mean(), abs=1e-15)
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=1e-12)


def test_two_way_bootstrap_variance_matches_the_closed_form_of_an_additive_table():
    # x[s, p] = a_s + b_p: a replicate is w_s·a + w_p·b with independent multinomial weights, so its
    # variance is var(a)/S + var(b)/P (population variances), and the replicates are normal to first order
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1.0, 4), rng.normal(0, 2.0, 50)
    x = a[:, None] + b[None, :]
    draws = BootstrapDraws.draw(4, 50, num_resamples=40000, seed=5)
    reps = draws.replicates(x)
    expected = a.var() / 4 + b.var() / 50
    assert reps.var() == pytest.approx(expected, rel=0.03)
    assert reps.mean() == pytest.approx(x.mean(), abs=4 * math.sqrt(expected / 40000))


def test_paired_difference_cancels_shared_prompt_variation_and_curves_keep_their_shape():
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1.0, 64)
    base = prompt_effect[None, :] + rng.normal(0, 0.05, (3, 64))
    better = base + 0.1 + rng.normal(0, 0.05, (3, 64))
    draws = BootstrapDraws.draw(3, 64, num_resamples=2000, seed=1)
    diff = paired_difference(better, base, draws)
    assert diff.excludes_zero and diff.low > 0.05 and diff.high < 0.15
    unpaired_width = bootstrap_mean(better, draws).high - bootstrap_mean(better, draws).low
    assert diff.high - diff.low < unpaired_width / 5
    curve = bootstrap_curve(np.stack([base, better], axis=-1), draws)
    assert len(curve["mean"]) == 2 and all(lo <= m <= hi for lo, m, hi in zip(curve["low"], curve["mean"], curve["high"]))
    with pytest.raises(ValueError, match="shape"):
        draws.replicates(base[:, :10])


def test_sum_pairs_ood_split_is_beyond_every_training_target():
    from fdpo.data.tasks import eval_records, get_task

    task = get_task("sum_pairs")
    ood = eval_records(task, "ood")
    assert len(ood) == 60 and min(r["target"] for r in ood) > max(r["target"] for r in task.prompts("train"))
    assert {r["prompt"] for r in ood}.isdisjoint(r["prompt"] for r in task.prompts("eval"))
    from fdpo.errors import RecipeError

    with pytest.raises(RecipeError, match="no out-of-distribution split"):
        eval_records("between", "ood")
