"""Recipes: one YAML file per experiment, validated into TRL-style config dataclasses."""

from fdpo.errors import RecipeError
from fdpo.recipe.load import Recipe, RecipeArguments, all_keys, load_recipe, parse_overrides

__all__ = ["Recipe", "RecipeArguments", "RecipeError", "all_keys", "load_recipe", "parse_overrides"]
