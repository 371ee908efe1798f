"""Self-checks of the oracles in tests/truth.py: each generator vanishes at u = 1 and its derivatives agree
with numerical differentiation (mpmath), the torch and mpmath back ends agree, every registry entry has an
oracle, and the two independently written oracles (generator sums and closed forms) give the same numbers."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from truth import (
    CASES,
    ENTRY_PARAMS,
    MpOps,
    case_id,
    divergence_by_generator,
    divergence_closed_form,
    generator,
)

from fdpo.divergences import available_divergences

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


def test_every_registry_entry_has_a_direct_form():
    for name in available_divergences():
        divergence_closed_form(
            name, ENTRY_PARAMS.get(name, {}), torch.zeros(1, 3).log_softmax(-1), torch.zeros(1, 3).log_softmax(-1)
        )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_generator_sums_and_closed_forms_agree(case):
    name, params = case
    g = torch.Generator().manual_seed(0)
    logp = (2 * torch.randn(4, 9, generator=g, dtype=torch.float64)).log_softmax(-1)
    logq = (2 * torch.randn(4, 9, generator=g, dtype=torch.float64)).log_softmax(-1)
    by_generator = divergence_by_generator(name, params, logp.exp(), logq.exp())
    torch.testing.assert_close(by_generator, divergence_closed_form(name, params, logp, logq), rtol=1e-10, atol=1e-12)
