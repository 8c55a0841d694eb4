"""RECIPE: continuous prompts from a sentence encoder, retrieved past a Knowledge Sentinel."""

from kmd.editors.recipe.config import RecipeConfig
from kmd.editors.recipe.editor import RecipeEditor

__all__ = ["RecipeConfig", "RecipeEditor"]
