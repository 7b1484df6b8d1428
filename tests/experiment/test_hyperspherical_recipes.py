"""The recipes of the Pruning On-the-Fly experiment (METHODS §1.6) say what its arms are."""

import json
from pathlib import Path

import pytest

from prunekit.experiment.recipe import RecipeError, load_recipe
from prunekit.methods.hyperspherical import Hyperspherical, PrunedEnergyHook, pick_lambda

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "hyperspherical"
CALIBRATION = ROOT / "benchmarks" / "results" / "hyperspherical" / "lambda-s0.5-e5.json"
CALIBRATED_LAM = json.loads(CALIBRATION.read_text())["chosen_lam"]  # §1.3.3: the sweep picks λ
ARMS = {  # recipe: (convs, lam, penalty sparsity, ratio)
    "standard": ("standard", 0.0, 0.5, 0.5),
    "hs": ("hyperspherical", 0.0, 0.5, 0.5),
    "hs_penalty_s0.5": ("hyperspherical", CALIBRATED_LAM, 0.5, 0.5),
    "hs_penalty_s0.7": ("hyperspherical", CALIBRATED_LAM, 0.7, 0.7),
}
FINETUNED = ("standard", "hs_penalty_s0.5", "hs_penalty_s0.7")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name the data relative to the repository


def arm(name: str):
    return load_recipe(RECIPES / f"{name}.yaml")


def test_the_directory_holds_exactly_the_arms_and_their_fine_tunes():
    expected = {*ARMS, *(f"finetune_{a}" for a in FINETUNED)}
    assert {p.stem for p in RECIPES.glob("*.yaml")} == expected


@pytest.mark.parametrize("name", sorted(ARMS))
def test_arm_settings(name):
    recipe = arm(name)
    prune = recipe.prune
    assert isinstance(prune, Hyperspherical)
    assert (prune.convs, prune.lam, prune.sparsity, prune.ratio) == ARMS[name]
    assert (prune.scope, prune.prune_classifier, prune.recovery, prune.normalize_input) == ("local", True, "none", False)
    assert (recipe.model.name, recipe.data.name, recipe.data.batch_size) == ("resnet20", "cifar10", 128)
    assert recipe.retrain is None
    hooks = prune.train_hooks(recipe)
    assert [type(h) for h in hooks] == ([] if prune.convs == "standard" else [PrunedEnergyHook])


def test_the_committed_calibration_is_the_whole_sweep_and_its_choice_follows_the_rule():
    result = json.loads(CALIBRATION.read_text())
    assert sorted(row["lam"] for row in result["rows"]) == [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]
    assert result["chosen_lam"] == pick_lambda({row["lam"]: row["dense_test_acc"] for row in result["rows"]})


def test_every_arm_trains_with_the_same_budget_optimizer_and_lr_plan():
    trains = {name: arm(name).train.model_dump() for name in ARMS}
    reference = trains["standard"]
    assert all(train == reference for train in trains.values())
    assert (reference["epochs"], reference["optimizer"], reference["lr"], reference["lr_plan"]) == (15, "sgd", 0.1,
                                                                                                     "cosine")
    assert {arm(name).data.model_dump_json() for name in ARMS} == {arm("standard").data.model_dump_json()}


@pytest.mark.parametrize("name", FINETUNED)
def test_fine_tune_recipe_is_its_arm_pruned_at_0_7_then_one_identical_fine_tune(name):
    recipe, base = load_recipe(RECIPES / f"finetune_{name}.yaml"), arm(name)
    assert recipe.train == base.train
    assert recipe.prune == base.prune.model_copy(update={"ratio": 0.7})
    reference = load_recipe(RECIPES / "finetune_standard.yaml").retrain
    assert recipe.retrain == reference
    assert (reference.epochs, reference.optimizer, reference.lr, reference.lr_plan) == (3, "sgd", 0.01, "cosine")


def test_the_standard_arm_refuses_a_penalty_and_recovery_refuses_fine_tuning():
    with pytest.raises(RecipeError, match=r"^prune\.lam: the penalty needs hyperspherical convs"):
        load_recipe(RECIPES / "standard.yaml", ["prune.lam=1.0"])
    with pytest.raises(RecipeError, match=r"^prune\.recovery: a recovered model is mask \+ constant"):
        load_recipe(RECIPES / "finetune_hs_penalty_s0.5.yaml", ["prune.recovery=layer_mean"])
    # without a retrain section, recovery is allowed
    assert load_recipe(RECIPES / "hs_penalty_s0.5.yaml", ["prune.recovery=layer_mean"]).prune.recovery == "layer_mean"
