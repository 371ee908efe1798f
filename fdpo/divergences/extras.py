"""Objectives a recipe names in the `divergence` key that are not one f-divergence of the registry.

Each is a registry fact like an entry's flags: its canonical name, its aliases, the trainers that
implement it and a one-line summary. The registry refuses an f-divergence alias that clashes with
one of these names, and `fdpo.divergences.extra_objective` resolves a name (same normalisation as
divergence names: case-insensitive, '-'/' ' count as '_').
"""

from __future__ import annotations

from dataclasses import dataclass

from fdpo.divergences.registry import _normalise, reserve_names


@dataclass(frozen=True)
class ExtraObjective:
    """A non-f objective selectable through `divergence` (it has no f, f′ or parameters)."""

    canonical: str
    aliases: tuple[str, ...]
    trainers: tuple[str, ...]
    summary: str
    source: str


EXTRA_OBJECTIVES: dict[str, ExtraObjective] = {}


def register_extra(obj: ExtraObjective) -> ExtraObjective:
    reserve_names(obj.canonical, (obj.canonical, *obj.aliases))
    EXTRA_OBJECTIVES[obj.canonical] = obj
    return obj


BDKD = register_extra(
    ExtraObjective(
        canonical="bdkd",
        aliases=("bd_kd", "balanced_kl"),
        trainers=("distill",),
        summary="BD-KD: entropy-balanced forward + reverse KL per position (fdpo/losses/distill.py)",
        source="Amara et al. 2022, 'Balancing the Divergences for Online Knowledge Distillation'; "
        "docs/objectives.md §9",
    )
)


def extra_objective(name: str) -> ExtraObjective | None:
    """The extra objective ``name`` (canonical or alias) denotes, or None."""
    key = _normalise(name)
    for obj in EXTRA_OBJECTIVES.values():
        if key in {_normalise(n) for n in (obj.canonical, *obj.aliases)}:
            return obj
    return None


__all__ = ["BDKD", "EXTRA_OBJECTIVES", "ExtraObjective", "extra_objective", "register_extra"]
