"""The playground's classic picture, as a test: fitting one Gaussian π to a two-Gaussian mixture
π_ref, reverse KL(π‖π_ref) settles on one mode while forward KL(π_ref‖π) matches the mixture's
mean and standard deviation (the known optimum of forward KL over Gaussians)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "divergence_playground.py"


@pytest.fixture(scope="module")
def playground():
    spec = importlib.util.spec_from_file_location("divergence_playground", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reverse_kl_seeks_a_mode_and_forward_kl_covers_both(playground):
    grid = torch.linspace(-10.0, 10.0, 2001, dtype=torch.float64)
    mean, std, _ = playground.fit("reverse_kl", grid, steps=300)
    assert mean == pytest.approx(playground.MEANS[1], abs=0.05) and std == pytest.approx(
        playground.STDS[1], abs=0.05
    )
    w, m, s = playground.WEIGHTS, playground.MEANS, playground.STDS
    mix_mean = sum(a * b for a, b in zip(w, m))
    mix_std = math.sqrt(sum(a * (c**2 + b**2) for a, b, c in zip(w, m, s)) - mix_mean**2)
    mean, std, _ = playground.fit("forward_kl", grid, steps=300)
    assert mean == pytest.approx(mix_mean, abs=0.05) and std == pytest.approx(mix_std, rel=0.02)


def test_playground_cli_writes_the_png(playground, tmp_path):
    out = tmp_path / "pg.png"
    assert playground.main(["--out", str(out), "--steps", "5"]) == 0
    assert out.stat().st_size > 10_000
