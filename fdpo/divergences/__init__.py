"""The divergence registry: every f-divergence D_f(π ‖ π_ref) = Σ_v π_ref(v) f(π(v)/π_ref(v)).

Conventions: ``docs/objectives.md`` §0–§1. π is the trained policy (or student),
π_ref the reference (or teacher), ℓ = log π − log π_ref, u = e^ℓ; α follows the f-DPO paper.

- :func:`get_divergence` / :func:`available_divergences`: the registry (``entries.py``, one class
  per divergence); each :class:`Divergence` evaluates f, f′, f/u, u f′ stably from ℓ.
- :func:`full_vocab_divergence`, :func:`full_vocab_divergence_from_hidden`: exact per-position
  divergence over the vocabulary, chunked, memory ≈ one chunk.
- :mod:`fdpo.divergences.estimators`: per-token sample estimators (k1, k2, k3, k3 × ratio,
  generator losses on reference or policy samples), each stating what it estimates and which
  gradient it follows.
- :func:`print_divergence_table` / :func:`format_divergence_table`: the registry as a table.
"""

from fdpo.divergences import entries as _entries  # noqa: F401  (registers the entries)
from fdpo.divergences.base import Divergence, VocabChunk
from fdpo.divergences.entries import (
    Alpha,
    ForwardKL,
    GeneralizedJSD,
    Jeffreys,
    JensenShannon,
    NeymanChi2,
    PearsonChi2,
    ReverseKL,
    SquaredHellinger,
    TotalVariation,
)
from fdpo.divergences.estimators import (
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_importance_weighted,
    kl_k3_plus,
    policy_sample_generator_loss,
    ref_sample_generator_loss,
)
from fdpo.divergences.extras import EXTRA_OBJECTIVES, ExtraObjective, extra_objective
from fdpo.divergences.full_vocab import full_vocab_divergence, full_vocab_divergence_from_hidden
from fdpo.divergences.numerics import (
    report_saturation,
    reset_saturation_counts,
    saturation_counts,
    set_saturation_tracking,
)
from fdpo.divergences.registry import (
    available_divergences,
    divergence_aliases,
    divergence_class,
    f_dpo_valid_divergences,
    get_divergence,
    register,
    resolve_divergence,
)
from fdpo.divergences.table import divergence_table_rows, format_divergence_table, print_divergence_table

__all__ = [
    "EXTRA_OBJECTIVES",
    "Alpha",
    "Divergence",
    "ExtraObjective",
    "ForwardKL",
    "GeneralizedJSD",
    "Jeffreys",
    "JensenShannon",
    "NeymanChi2",
    "PearsonChi2",
    "ReverseKL",
    "SquaredHellinger",
    "TotalVariation",
    "VocabChunk",
    "available_divergences",
    "divergence_aliases",
    "divergence_class",
    "divergence_table_rows",
    "extra_objective",
    "f_dpo_valid_divergences",
    "format_divergence_table",
    "full_vocab_divergence",
    "full_vocab_divergence_from_hidden",
    "get_divergence",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_importance_weighted",
    "kl_k3_plus",
    "policy_sample_generator_loss",
    "print_divergence_table",
    "ref_sample_generator_loss",
    "register",
    "report_saturation",
    "reset_saturation_counts",
    "resolve_divergence",
    "saturation_counts",
    "set_saturation_tracking",
]
