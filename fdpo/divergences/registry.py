"""Name → :class:`Divergence` lookup with aliases, parameter validation and helpful errors.

    get_divergence("kl")                 → reverse_kl
    get_divergence("alpha", alpha=0.5)   → alpha(0.5)
    get_divergence("alpha(0.5)")         → alpha(0.5)   (a logged label round-trips)
    available_divergences()              → canonical names, in registration order

Entries register themselves with the :func:`register` class decorator (see ``entries.py``).
Names are case-insensitive and '-'/' ' count as '_'.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from fdpo.divergences.base import Divergence

_D = TypeVar("_D", bound=type[Divergence])

_ENTRIES: dict[str, type[Divergence]] = {}  # canonical name → class
_NAMES: dict[str, str] = {}  # canonical name or alias → canonical name
_RESERVED: dict[str, str] = {}  # names of the non-f extra objectives (extras.py) → their canonical name


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _check_free(owner: str, names: tuple[str, ...]) -> None:
    for raw in names:
        name = _normalise(raw)
        taken = _NAMES.get(name) or _RESERVED.get(name)
        if taken is not None and taken != owner:
            raise ValueError(f"divergence name {name!r} is already taken by '{taken}'")


def reserve_names(owner: str, names: tuple[str, ...]) -> None:
    """Keep ``names`` (a non-f objective's, see extras.py) from being registered as divergence names."""
    _check_free(owner, names)
    for raw in names:
        _RESERVED[_normalise(raw)] = owner


def register(cls: _D) -> _D:
    """Class decorator adding one divergence (its canonical name and aliases) to the registry."""
    names = (cls.canonical, *cls.aliases)
    _check_free(cls.canonical, names)
    for field in ("formula", "f_prime_formula", "equals", "f_dpo_valid", "mass_covering"):
        if not hasattr(cls, field):
            raise TypeError(f"divergence class {cls.__name__} lacks the class attribute '{field}'")
    _ENTRIES[cls.canonical] = cls
    for raw in names:
        _NAMES[_normalise(raw)] = cls.canonical
    return cls


def available_divergences() -> list[str]:
    """Canonical names of every registered divergence."""
    return list(_ENTRIES)


def divergence_aliases() -> dict[str, str]:
    """Every accepted name (canonical names and aliases) → canonical name."""
    return dict(_NAMES)


def divergence_class(name: str) -> type[Divergence]:
    """The registered class for a name or alias (no parameters needed)."""
    key = _normalise(name)
    if key not in _NAMES:
        valid = sorted(_NAMES)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown divergence {name!r}.{hint} Valid names: {', '.join(available_divergences())} "
            f"(aliases: {', '.join(sorted(set(_NAMES) - set(_ENTRIES)))})."
        )
    return _ENTRIES[_NAMES[key]]


_LABEL = re.compile(r"^\s*([A-Za-z0-9_\- ]+?)\s*\((.*)\)\s*$")


def _parse_label(name: str) -> tuple[str, dict[str, Any], list[str]]:
    """'alpha(0.5)' → ('alpha', {}, ['0.5']); 'x(a=1,b=2)' → ('x', {'a': '1', 'b': '2'}, [])."""
    m = _LABEL.match(name)
    if not m:
        return name, {}, []
    kwargs: dict[str, Any] = {}
    positional: list[str] = []
    for part in filter(None, (p.strip() for p in m.group(2).split(","))):
        if "=" in part:
            k, v = part.split("=", 1)
            kwargs[k.strip()] = v.strip()
        else:
            positional.append(part)
    return m.group(1), kwargs, positional


def _as_number(name: str, key: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError as err:
            raise ValueError(
                f"divergence '{name}': parameter '{key}' must be a number, got {value!r}"
            ) from err
    return value


def get_divergence(name: str | Divergence, **params: Any) -> Divergence:
    """The divergence registered under ``name`` (canonical name, alias or a label such as 'alpha(0.5)').

    Raises ``ValueError`` naming the valid choices (and the nearest match) for an unknown name, an
    unknown or missing parameter, or a parameter out of its range.
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(
                f"parameters {sorted(params)} given together with a built divergence {name.label}"
            )
        return name
    if not isinstance(name, str):
        raise TypeError(f"divergence name must be a string, got {type(name).__name__}")
    base, label_kwargs, positional = _parse_label(name)
    cls = divergence_class(base)
    specs = cls.parameter_specs()
    if positional:
        if len(positional) > 1 or len(specs) != 1:
            raise ValueError(
                f"divergence '{cls.canonical}': write its parameters as name=value "
                f"({', '.join(specs) or 'it takes none'}), got {name!r}"
            )
        label_kwargs[next(iter(specs))] = positional[0]
    for key in label_kwargs.keys() & params.keys():
        raise ValueError(
            f"divergence '{cls.canonical}': parameter '{key}' given twice ({name!r} and {key}=...)"
        )
    merged = {**label_kwargs, **params}
    for key in merged:
        if key not in specs:
            close = difflib.get_close_matches(key, list(specs), n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            accepted = ", ".join(specs) if specs else "none"
            raise ValueError(
                f"divergence '{cls.canonical}' has no parameter {key!r}.{hint} Accepted parameters: {accepted}."
            )
    for key, spec in specs.items():
        if spec["required"] and key not in merged:
            lo, hi = spec.get("range", (None, None))
            rng = f" in ({lo:g}, {hi:g})" if lo is not None else ""
            raise ValueError(
                f"divergence '{cls.canonical}' needs the parameter '{key}'{rng}, e.g. "
                f"get_divergence('{cls.canonical}', {key}=0.5) or '{cls.canonical}: ...' with "
                f"'{key}: 0.5' in a recipe. {spec.get('help', '')}".rstrip()
            )
    return cls(**{k: _as_number(cls.canonical, k, v) for k, v in merged.items()})


def resolve_divergence(divergence: str | Divergence, params: Mapping[str, Any] | None = None) -> Divergence:
    """fdpo's one resolver: a :class:`Divergence` from itself, or from a name/label with ``params``
    (e.g. ``resolve_divergence("alpha", {"alpha": 0.3})``; parameters may also sit in the label)."""
    return get_divergence(divergence, **dict(params or {}))


def f_dpo_valid_divergences() -> list[str]:
    """Canonical names of the entries f-DPO accepts (f′ invertible, 0 ∉ dom f′; docs/objectives.md §3)."""
    return [name for name, cls in _ENTRIES.items() if cls.f_dpo_valid]
