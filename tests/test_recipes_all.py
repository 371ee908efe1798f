"""Every shipped recipe validates through the recipe loader (no model or data is loaded), sits in the folder of
its trainer (recipes/<model>/<trainer>/, pipelines and sweeps apart), and every GPU recipe names an accelerate
config that exists, so a recipe cannot rot silently when a config field changes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_TRAINING = {"pipelines", "sweeps"}  # recipes/<model>/pipelines/ and /sweeps/ hold no training recipe
RECIPES = sorted(p for p in (REPO / "recipes").glob("*/*/*.yaml") if p.parent.name not in NOT_TRAINING)


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


def test_every_recipe_is_in_a_model_and_trainer_folder():
    assert RECIPES, "no recipe found under recipes/<model>/<trainer>/"
    stray = [p for p in (REPO / "recipes").rglob("*.yaml") if len(p.relative_to(REPO / "recipes").parts) != 3]
    assert not stray, f"recipes belong in recipes/<model>/<trainer or pipelines or sweeps>/: {stray}"


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_sits_in_its_trainers_folder(path):
    from fdpo.recipe.load import read_yaml

    assert read_yaml(path)["trainer"] == path.parent.name


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_validates(path, tmp_path):
    from fdpo.recipe import load_recipe
    from fdpo.recipe.load import read_yaml
    from fdpo.trainers.registry import get_trainer_spec

    recipe = load_recipe(path, {"output_dir": str(tmp_path)})
    spec = get_trainer_spec(read_yaml(path)["trainer"])
    assert isinstance(recipe.training_args, spec.config_class())


@pytest.mark.parametrize(
    "path", [p for p in RECIPES if p.parents[1].name != "tiny"], ids=_id
)
def test_gpu_recipe_names_an_existing_accelerate_config(path):
    configs = re.findall(r"--config_file (\S+)", path.read_text())
    assert configs, f"{path} should say how to launch it (accelerate launch --config_file ...)"
    for config in configs:
        assert (REPO / config).is_file(), f"{path} names {config}, which does not exist"


def test_quickstart_pipeline_parses_and_chains_its_stages():
    from fdpo.pipeline import parse_pipeline

    _, stages = parse_pipeline(REPO / "recipes" / "tiny" / "pipelines" / "quickstart.yaml")
    names = [s.name for s in stages]
    kinds = {s.name: s.kind for s in stages}
    for needed in ("sft", "dpo", "presample", "grpo_dph_js", "post_dpo_sft"):
        assert needed in names
    assert kinds["presample"] == "presample" and kinds["grpo_dph_js"] == "train"
    assert names.index("dpo") < names.index("presample") < names.index("grpo_dph_js")
    assert names[-1].startswith("eval")
