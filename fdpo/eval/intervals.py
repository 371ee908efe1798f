"""Seeded bootstrap intervals over prompts and seeds, and paired differences against a baseline.

A method's metric is a table x[s, p] (training seed s = 1…S, eval prompt p = 1…P; extra trailing
axes, e.g. k of a pass@k curve, are carried along). Its estimate is the grand mean x̄ = (1/SP) Σ x[s, p].
The interval is the percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap",
1993, §13.3) of a two-way resample: each replicate b draws S seeds and P prompts with replacement,
independently, and evaluates

    x̄*_b = (1/SP) Σ_i Σ_j x[s*_bi, p*_bj] = w_s*_b · x · w_p*_b,

where w_s*_b[s] (w_p*_b[p]) is the fraction of the draws that picked seed s (prompt p). The 95%
interval is the 2.5th and 97.5th percentiles of the replicates (numpy's linear interpolation),
so it reflects the spread over prompts AND over training seeds. With one seed no seed is drawn,
and the result is exactly scipy.stats.bootstrap(method="percentile") of the prompt means on the
same generator (tests/test_sweep_stats.py checks that).

Paired difference against a baseline: d[s, p] = x_method[s, p] − x_base[s, p] on the same prompts
(and the same seed index), bootstrapped the same way: the prompt-to-prompt variation both methods
share cancels, so a small but consistent gain shows up as an interval excluding 0. Every metric of
one comparison uses the SAME replicates (`BootstrapDraws`), so the intervals are mutually consistent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval; `excludes_zero` is `low > 0 or high < 0`."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


@dataclass(frozen=True)
class BootstrapDraws:
    """The replicate weights w_s (B × S) and w_p (B × P) of a two-way bootstrap (module docstring)."""

    seed_weights: np.ndarray
    prompt_weights: np.ndarray

    @classmethod
    def draw(cls, num_seeds: int, num_prompts: int, *, num_resamples: int = DEFAULT_RESAMPLES,
             seed: int = 0) -> BootstrapDraws:
        """Draw the replicates from `numpy.random.default_rng(seed)`: prompts first, then seeds (if S > 1)."""
        if num_seeds < 1 or num_prompts < 1:
            raise ValueError(f"bootstrap: need at least one seed and one prompt, got {num_seeds} × {num_prompts}")
        rng = np.random.default_rng(seed)
        prompt_idx = rng.integers(0, num_prompts, (num_resamples, num_prompts))
        seed_idx = (
            rng.integers(0, num_seeds, (num_resamples, num_seeds))
            if num_seeds > 1
            else np.zeros((num_resamples, 1), dtype=np.int64)
        )
        return cls(_weights(seed_idx, num_seeds), _weights(prompt_idx, num_prompts))

    @property
    def shape(self) -> tuple[int, int]:
        return self.seed_weights.shape[1], self.prompt_weights.shape[1]

    def replicates(self, values: np.ndarray) -> np.ndarray:
        """x̄*_b for every replicate b: shape (B, *values.shape[2:])."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[:2] != self.shape:
            raise ValueError(f"bootstrap: values have shape {values.shape[:2]}, the draws are for {self.shape}")
        return np.einsum("bs,sp...,bp->b...", self.seed_weights, values, self.prompt_weights)


def _weights(idx: np.ndarray, n: int) -> np.ndarray:
    counts = np.zeros((idx.shape[0], n), dtype=np.float64)
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return counts / idx.shape[1]


def percentile_interval(replicates: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The (1 − confidence)/2 and (1 + confidence)/2 percentiles of the replicates along axis 0."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return low, high


def bootstrap_mean(values: np.ndarray, draws: BootstrapDraws, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Grand mean of x[s, p] with its two-way percentile bootstrap interval (module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = percentile_interval(draws.replicates(values), confidence)
    return Interval(float(values.mean()), float(low), float(high))


def bootstrap_curve(values: np.ndarray, draws: BootstrapDraws,
                    confidence: float = DEFAULT_CONFIDENCE) -> dict[str, list[float]]:
    """Mean and interval at every point of a curve x[s, p, k] (e.g. pass@k, k = 1…n)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = percentile_interval(draws.replicates(values), confidence)
    return {"mean": values.mean(axis=(0, 1)).tolist(), "low": low.tolist(), "high": high.tolist()}


def paired_difference(values: np.ndarray, baseline: np.ndarray, draws: BootstrapDraws,
                      confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Mean of x_method − x_base on the same (seed, prompt) cells, with its bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"paired difference: shapes differ ({values.shape} vs baseline {baseline.shape})")
    return bootstrap_mean(values - baseline, draws, confidence)
