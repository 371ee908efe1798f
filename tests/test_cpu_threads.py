"""`cpu_threads`: torch's thread count is set for the run only, restored after, and a bad value names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdpo.cpu_threads import torch_threads

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the setting applies to CPU-only machines")
def test_threads_set_inside_and_restored_after():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failing run restores the setting too")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_invalid_value_names_the_key(tmp_path):
    from fdpo.errors import RecipeError
    from fdpo.recipe import load_recipe

    with pytest.raises(ValueError, match="cpu_threads"), torch_threads(0):
        pass
    # refused when the recipe loads, before any run starts (fdpo.recipe.validate.RANGES)
    with pytest.raises(RecipeError, match="cpu_threads"):
        load_recipe(REPO / "recipes" / "tiny" / "sft" / "sft.yaml", {"cpu_threads": 0, "output_dir": str(tmp_path)})
