"""Shared fixtures: the offline tiny model and the sum_pairs data, each built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the untrained tiny Llama model + tokenizer (`fdpo tiny`, seed 0, sum_pairs)."""
    from fdpo.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), arch="llama", seed=0, task="sum_pairs")


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every stage's sum_pairs data (`fdpo data sum_pairs`, seed 0)."""
    from fdpo.data.tasks import write_task_data

    out = tmp_path_factory.mktemp("task_data")
    write_task_data("sum_pairs", out, seed=0)
    return out
