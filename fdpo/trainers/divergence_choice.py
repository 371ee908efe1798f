"""The divergence a recipe chooses, as every trainer config holds it: `divergence`, `alpha`, `divergence_params`.

One convention for all configs (docs/objectives.md §0): α is the f-DPO paper's (α → 0 reverse KL, α → 1 forward KL;
TRL's `f_alpha_divergence_coef` is 1 − α). A recipe may give α as `alpha:` or inside `divergence_params`, never
both with different values; after validation the config stores one canonical form: the registry's canonical
name, α in `alpha`, every other parameter in `divergence_params`.
"""

from __future__ import annotations

from typing import Any


class DivergenceChoice:
    """Mixin for config dataclasses that declare `divergence`, `alpha` and `divergence_params` fields."""

    divergence: str
    alpha: float | None
    divergence_params: dict[str, Any] | None

    def divergence_kwargs(self) -> dict[str, Any]:
        """Keyword parameters for `fdpo.divergences.get_divergence` (α merged into `divergence_params`)."""
        params = dict(self.divergence_params or {})
        if self.alpha is not None:
            if "alpha" in params and params["alpha"] != self.alpha:
                raise ValueError(f"alpha is given twice: alpha={self.alpha} and divergence_params={params}")
            params["alpha"] = self.alpha
        return params

    def store_canonical_divergence(self, canonical: str, params: dict[str, Any]) -> None:
        """Keep one canonical form: the registry's name, α in `alpha`, the rest in `divergence_params`."""
        params = dict(params)
        self.divergence = canonical
        self.alpha = params.pop("alpha", None)
        self.divergence_params = params or None
