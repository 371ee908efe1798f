"""The divergence a recipe chooses, declared once for every trainer config: `divergence`, `alpha`, `divergence_params`.

One convention for all configs (docs/objectives.md §0): α is the f-DPO paper's (α → 0 reverse KL, α → 1 forward KL;
TRL's `f_alpha_divergence_coef` is 1 − α). A recipe may give α as `alpha:` or inside `divergence_params`, never
both with different values; after validation the config stores one canonical form: the registry's canonical
name, α in `alpha`, every other parameter in `divergence_params`. The help texts are generated from the registry
(fdpo/divergences), so they list exactly the names, parameters and f-DPO-valid entries it holds.

`DivergenceChoice` is a dataclass mixin placed first among a config's bases (`FDPOConfig(DivergenceChoice,
DPOConfig)`): its three fields come after every field of the TRL parent, whose fields and defaults are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fdpo.divergences import (
    Divergence,
    available_divergences,
    divergence_class,
    f_dpo_valid_divergences,
    resolve_divergence,
)
from fdpo.divergences.extras import EXTRA_OBJECTIVES

_T = TypeVar("_T")


def _divergence_help() -> str:
    names = available_divergences()
    valid = f_dpo_valid_divergences()
    invalid = [n for n in names if n not in valid]
    extras = "; ".join(f"`{o.canonical}` ({', '.join(o.trainers)} only): {o.summary}" for o in EXTRA_OBJECTIVES.values())
    return (
        f"The f-divergence D_f(π‖π_ref) that regularises the objective (docs/objectives.md §0), a name from fdpo's "
        f"registry: {', '.join(f'`{n}`' for n in names)} (aliases accepted, e.g. `kl`, `fkl`, `jsd`; the "
        f"canonical name is stored; `fdpo divergences` lists every name). f-DPO (`trainer: dpo`) takes only the f-DPO-valid ones, "
        f"{', '.join(valid)}; {' and '.join(invalid)} are rejected there (f′ must be invertible with 0 ∉ dom f′, "
        f"§3). Not an f-divergence: {extras}."
    )


def _params_help() -> str:
    parts = []
    for name in available_divergences():
        specs = divergence_class(name).parameter_specs()
        for key, spec in specs.items():
            lo, hi = spec.get("range", (None, None))
            rng = f" ∈ ({lo:g}, {hi:g})" if lo is not None else ""
            parts.append(f"{name}: {key}{rng}{'' if spec['required'] else ' (optional)'}")
    return "Keyword parameters of the divergence, passed to the registry (" + "; ".join(parts) + ")."


def divergence_field(default: str, note: str = "") -> Any:
    """The `divergence` field with the registry's help (a config whose default differs redeclares it with this)."""
    return field(default=default, metadata={"help": _divergence_help() + (f" {note}" if note else "")})


@dataclass
class DivergenceChoice:
    """Dataclass mixin: the `divergence`, `alpha` and `divergence_params` fields of every fdpo trainer config."""

    divergence: str = divergence_field("reverse_kl")
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "α of `divergence: alpha` in the f-DPO paper's convention (docs/objectives.md §0): "
            "f′(u) = (1 − u^−α)/α, α → 0 is reverse KL, α → 1 forward KL; TRL's `f_alpha_divergence_coef` is "
            "a = 1 − α. Required with `divergence: alpha` (or write `alpha(0.5)`)."
        },
    )
    divergence_params: dict[str, Any] | None = field(default=None, metadata={"help": _params_help()})

    def divergence_kwargs(self) -> dict[str, Any]:
        """Keyword parameters for the registry (α merged into `divergence_params`)."""
        params = dict(self.divergence_params or {})
        if self.alpha is not None:
            if "alpha" in params and params["alpha"] != self.alpha:
                raise ValueError(f"alpha is given twice: alpha={self.alpha} and divergence_params={params}")
            params["alpha"] = self.alpha
        return params

    def resolved_divergence(self) -> Divergence:
        """The registry's divergence this config names (docs/objectives.md §0)."""
        return resolve_divergence(self.divergence, self.divergence_kwargs())

    def store_canonical_divergence(self, canonical: str, params: dict[str, Any]) -> None:
        """Keep one canonical form: the registry's name, α in `alpha`, the rest in `divergence_params`."""
        params = dict(params)
        self.divergence = canonical
        self.alpha = params.pop("alpha", None)
        self.divergence_params = params or None

    def resolve_divergence_choice(self, resolve: Callable[[str, dict[str, Any]], _T] | None = None) -> _T:
        """Resolve the choice with ``resolve(name, params)`` (default: the registry's resolver; an objective
        with ``canonical`` and ``params``), store its canonical form and return it; an invalid choice is a
        ValueError naming the config class and the value."""
        try:
            obj = (resolve or resolve_divergence)(self.divergence, self.divergence_kwargs())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{type(self).__name__}: divergence={self.divergence!r}: {exc}") from exc
        self.store_canonical_divergence(obj.canonical, obj.params)
        return obj
