"""Evaluation metrics: unbiased pass@k and diversity (distinct correct answers, distinct-n).

pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code", §2.1): with n
samples of which c are correct, the probability that at least one of k samples drawn WITHOUT
replacement from the n is correct,

    pass@k = 1 − C(n − c, k) / C(n, k),

which is an unbiased estimator of the model's pass@k. Computed in the paper's numerically stable
product form, 1 − Π_{i = n−c+1}^{n} (1 − k / i), never forming the binomials.

distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation
Models"): the number of unique n-grams divided by the total number of n-grams over a set of
sequences (here: the token ids of one prompt's sampled completions).

Answer-coverage entropy: with the correct samples of one prompt falling on distinct answers a with
counts m_a (Σ m_a = c), H = −Σ_a (m_a / c) log(m_a / c) in nats (0 when c ≤ 1 or every correct
sample is the same answer; log(c) when all c are different). It tells "8 correct samples on one
answer" (H = 0) from "8 correct samples on 8 answers" (H = log 8), which pass@k cannot.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k) (stable product form)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_curve(n: int, c: int) -> list[float]:
    """[pass@1, …, pass@n] of one prompt with c of n samples correct (the unbiased estimator at every k)."""
    return [pass_at_k(n, c, k) for k in range(1, n + 1)]


def distinct_n(sequences: Iterable[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams / total n-grams over `sequences` (0.0 when there are no n-grams)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for seq in sequences:
        items = tuple(seq)
        for i in range(len(items) - n + 1):
            seen.add(items[i : i + n])
            total += 1
    return len(seen) / total if total else 0.0


def distinct_correct(answers: Iterable[str | None], correct: Iterable[bool]) -> int:
    """Number of distinct (normalised) answers among the correct ones."""
    return len({a for a, ok in zip(answers, correct) if ok and a is not None})


def answer_entropy(answers: Iterable[str | None], correct: Iterable[bool]) -> float:
    """Entropy (nats) of the distribution of distinct answers among the correct ones (module docstring)."""
    counts = Counter(a for a, ok in zip(answers, correct) if ok and a is not None)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((m / total) * math.log(m / total) for m in counts.values())
