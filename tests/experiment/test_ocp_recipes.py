"""The recipes of the One-Cycle Pruning experiment (METHODS §3.6) say what the paper's arms are."""

from pathlib import Path

import pytest

from prunekit.experiment.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "ocp"

ARMS = {  # schedule, window start, window end, shape parameters (METHODS §3.2, §3.6)
    "one_shot": ("one_shot", 0.4, 1.0, {}),
    "iterative": ("iterative", 0.2, 1.0, {"n": 3}),
    "agp": ("agp", 0.2, 1.0, {}),
    "one_cycle": ("one_cycle", 0.0, 1.0, {"alpha": 14, "beta": 5}),
}


@pytest.mark.parametrize("arm", ARMS)
def test_arm_recipe_encodes_the_paper_schedule_and_shared_training(arm):
    recipe = load_recipe(RECIPES / f"{arm}.yaml")
    dense = load_recipe(RECIPES / "dense.yaml")
    schedule = recipe.prune.sparsity_schedule()
    name, start, end, params = ARMS[arm]
    assert (schedule.name, schedule.start, schedule.end, schedule.final) == (name, start, end, 0.9)
    assert {k: recipe.prune.schedule.params.get(k) for k in params} == params
    assert (recipe.prune.granularity, recipe.prune.criterion, recipe.prune.scope) == ("weight", "l1", "local")
    assert recipe.prune.include_first_conv and not recipe.prune.include_classifier
    assert recipe.prune.train.config(0) == dense.train.config(0)  # no arm is tuned differently
    assert schedule(1.0) == 0.9
