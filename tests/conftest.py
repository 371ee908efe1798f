"""Shared fixtures: the offline tiny model and the sum_pairs data, each built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Developer shortcut, off unless set: FDPO_TEST_PREBUILT=DIR holding model/, data/ and sft/ from a
# quickstart run (`fdpo pipeline recipes/tiny/pipelines/quickstart.yaml` writes them under runs/tiny) lets the
# session fixtures below copy those instead of rebuilding them (the SFT stage is minutes on a busy
# machine). The copies are what `fdpo tiny`, `fdpo data` and the SFT recipe build, so only use it
# when your change does not touch how they are built. CI never sets it.
PREBUILT = os.environ.get("FDPO_TEST_PREBUILT")


def _prebuilt(name: str, dest: Path) -> Path | None:
    if not PREBUILT:
        return None
    src = Path(PREBUILT) / name
    if not src.is_dir():
        raise FileNotFoundError(f"FDPO_TEST_PREBUILT={PREBUILT}: no {name}/ there")
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoint-*", "incomplete-checkpoint-*"))
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the untrained tiny Llama model + tokenizer (`fdpo tiny`, seed 0, sum_pairs)."""
    from fdpo.models.tiny import build_tiny_model

    if (pre := _prebuilt("model", tmp_path_factory.mktemp("tiny_model") / "model")) is not None:
        return pre
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), arch="llama", seed=0, task="sum_pairs")


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every stage's sum_pairs data (`fdpo data sum_pairs`, seed 0)."""
    from fdpo.data.tasks import write_task_data

    out = tmp_path_factory.mktemp("task_data")
    if (pre := _prebuilt("data", out / "data")) is not None:
        return pre
    write_task_data("sum_pairs", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sft_dir(tiny_model_dir: Path, task_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after `recipes/tiny/sft/sft.yaml` (1000 steps × 64, ~80 s on 2 cores), trained once per session.

    The starting point of every downstream objective's tests (DPO, GRPO, distillation, post-DPO SFT), as
    the quickstart's SFT stage is for their recipes. pass@1 ≈ 0.9 on held-out sum_pairs prompts.
    """
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    out = tmp_path_factory.mktemp("tiny_sft") / "sft"
    if (pre := _prebuilt("sft", out)) is not None:
        return pre
    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft" / "sft.yaml",
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(task_data_dir / "sft.jsonl"),
            "output_dir": str(out),
            "logging_steps": 50,
            "save_strategy": "no",
        },
    )
    run_training(recipe)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tests on tiny tensors (with 2 threads on a busy
    2-core machine a tiny forward takes ~100× longer); the previous setting is restored after.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
