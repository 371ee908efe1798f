"""Recipes: one YAML file per experiment, validated into TRL-style config dataclasses.

Layer: above fdpo/trainers (a recipe is validated against the trainer's config class), beside
fdpo/train; the CLI and the pipeline load recipes and hand the loaded objects down.
"""

from fdpo.errors import RecipeError
from fdpo.recipe.load import Recipe, RecipeArguments, all_keys, load_recipe, parse_overrides
from fdpo.recipe.presample import PresampleRecipe, load_presample_recipe, presample_recipe

__all__ = [
    "PresampleRecipe",
    "Recipe",
    "RecipeArguments",
    "RecipeError",
    "all_keys",
    "load_presample_recipe",
    "load_recipe",
    "parse_overrides",
    "presample_recipe",
]
