"""Experiments: recipes (validated YAML), the stage runner, the SQLite results store, comparisons
and reports. See ``docs/recipes.md``.

    recipe = load_recipe("recipes/resnet20_magnitude_demo.yaml", ["train.epochs=2"])
    rows = run_recipe(recipe, "runs")          # one run directory per seed + a store row each
    resume("runs/NAME-DIGEST/s0")              # continue after a crash or a kill
"""

from prunekit.experiment.recipe import Problem, Recipe, RecipeError, load_recipe, validate_recipe
from prunekit.experiment.runner import resume, run_one, run_recipe
from prunekit.experiment.store import ResultsStore

__all__ = ["Problem", "Recipe", "RecipeError", "ResultsStore", "load_recipe",
           "resume", "run_one", "run_recipe", "validate_recipe"]
