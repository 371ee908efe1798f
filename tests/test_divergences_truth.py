"""Independent reference formulas for the divergence tests (written from docs/objectives.md §0 only).

f(u), f′(u) and f″(u) of every registered divergence, in terms of u (not ℓ), for two back ends:
float64 torch tensors (direct summation over small categoricals) and mpmath (50 digits, for the
numerical-accuracy tests). Nothing here imports fdpo's math; the other test files compare fdpo
against these. (This module also holds a few self-checks of the references themselves.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mpmath as mp
import pytest
import torch

# (canonical name, parameters) of every case the tests run
CASES: list[tuple[str, dict[str, float]]] = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.1}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 0.9}),
    ("jeffreys", {}),
    ("squared_hellinger", {}),
    ("neyman_chi2", {}),
    ("pearson_chi2", {}),
    ("total_variation", {}),
    ("generalized_jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.7}),
]


def case_id(case: tuple[str, dict[str, float]]) -> str:
    name, params = case
    return name + "".join(f"-{k}{v:g}" for k, v in params.items())


class TorchOps:
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    sign = staticmethod(torch.sign)
    abs = staticmethod(torch.abs)

    @staticmethod
    def const(x: float) -> float:
        return x


class MpOps:
    log = staticmethod(mp.log)
    sqrt = staticmethod(mp.sqrt)
    sign = staticmethod(mp.sign)
    abs = staticmethod(abs)

    @staticmethod
    def const(x: float) -> Any:
        return mp.mpf(x)


def generator(
    name: str, params: dict[str, float], ops: Any = TorchOps
) -> tuple[Callable, Callable, Callable]:
    """(f, f′, f″) as functions of u, straight from the docs/objectives.md table."""
    log, sqrt, sign, ab, c = ops.log, ops.sqrt, ops.sign, ops.abs, ops.const
    if name == "reverse_kl":
        return (lambda u: u * log(u), lambda u: log(u) + 1, lambda u: 1 / u)
    if name == "forward_kl":
        return (lambda u: -log(u), lambda u: -1 / u, lambda u: 1 / u**2)
    if name in ("js", "generalized_jsd"):
        b = c(params.get("beta", 0.5))
        return (
            lambda u: b * u * log(u) - (b * u + 1 - b) * log(b * u + 1 - b),
            lambda u: b * log(u / (b * u + 1 - b)),
            lambda u: b * (1 - b) / (u * (b * u + 1 - b)),
        )
    if name == "alpha":
        a = c(params["alpha"])
        return (
            lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
            lambda u: (1 - u ** (-a)) / a,
            lambda u: u ** (-a - 1),
        )
    if name == "jeffreys":
        return (lambda u: (u - 1) * log(u), lambda u: log(u) + 1 - 1 / u, lambda u: 1 / u + 1 / u**2)
    if name == "squared_hellinger":
        return (lambda u: (sqrt(u) - 1) ** 2, lambda u: 1 - 1 / sqrt(u), lambda u: 0.5 / (u * sqrt(u)))
    if name == "neyman_chi2":
        return (lambda u: (1 - u) ** 2 / u, lambda u: 1 - 1 / u**2, lambda u: 2 / u**3)
    if name == "pearson_chi2":
        return (lambda u: (u - 1) ** 2, lambda u: 2 * (u - 1), lambda u: 2 + 0 * u)
    if name == "total_variation":
        return (lambda u: ab(u - 1) / 2, lambda u: sign(u - 1) / 2, lambda u: 0 * u)
    raise KeyError(name)


def direct_divergence(name: str, params: dict[str, float], p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_v q_v f(p_v/q_v) over the last dimension, by direct summation (float64, p, q > 0)."""
    f = generator(name, params)[0]
    return (q * f(p / q)).sum(-1)


METHODS = ("f", "f_prime", "f_over_u", "u_f_prime", "f_normalized", "f_normalized_over_u")


def mp_method(name: str, params: dict[str, float], method: str, logr: float) -> tuple[Any, Any]:
    """(value, d value / dℓ) of one Divergence method at ℓ, in mpmath."""
    f, fp, fpp = generator(name, params, MpOps)
    u = mp.exp(mp.mpf(logr))
    c1 = fp(mp.mpf(1))
    fu, fpu, fppu = f(u), fp(u), fpp(u)
    if method == "f":
        return fu, u * fpu
    if method == "f_prime":
        return fpu, u * fppu
    if method == "f_over_u":
        return fu / u, fpu - fu / u
    if method == "u_f_prime":
        return u * fpu, u * fpu + u * u * fppu
    if method == "f_normalized":
        return fu - c1 * (u - 1), u * fpu - c1 * u
    if method == "f_normalized_over_u":
        g = fu - c1 * (u - 1)
        return g / u, (fpu - c1) - g / u
    raise KeyError(method)


# ------------------------------------------------------------------------ self-checks of the references


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_generators_vanish_at_one_and_derivatives_agree(case):
    name, params = case
    mp.mp.dps = 50
    f, fp, fpp = generator(name, params, MpOps)
    assert abs(f(mp.mpf(1))) < 1e-40
    for u in (mp.mpf("0.3"), mp.mpf("1.7"), mp.mpf(5)):
        assert abs(mp.diff(f, u) - fp(u)) < 1e-20 * (1 + abs(fp(u)))
        assert abs(mp.diff(fp, u) - fpp(u)) < 1e-20 * (1 + abs(fpp(u)))


def test_reference_torch_and_mpmath_agree():
    u = torch.tensor([0.25, 1.0, 3.5], dtype=torch.float64)
    for name, params in CASES:
        tf = generator(name, params)[0](u)
        mf = [float(generator(name, params, MpOps)[0](mp.mpf(float(x)))) for x in u]
        assert torch.allclose(tf, torch.tensor(mf, dtype=torch.float64), rtol=1e-12, atol=1e-14), name
    assert math.isclose(
        float(generator("js", {})[0](torch.tensor(0.0, dtype=torch.float64) + 1e-300)), math.log(2) / 2
    )
