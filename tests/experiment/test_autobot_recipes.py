"""The AutoBot experiment's recipes (recipes/autobot/): every arm loads, with the settings of METHODS §4.7-§4.9."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from prunekit.artifact import load_artifact
from prunekit.experiment.recipe import load_recipe
from prunekit.experiment.runner import run_recipe
from prunekit.measure import count_macs

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "autobot"
ARMS = {"scatter": ("gates", "scatter"), "keep": ("gates", "keep"), "l1": ("l1", "scatter"),
        "l1_uniform": ("l1_uniform", "scatter"), "random": ("random", "scatter")}


def test_every_arm_has_one_recipe():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(ARMS)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_arm_recipes_prune_the_committed_resnet20_to_45_percent_and_fine_tune_as_the_paper(arm):
    recipe = load_recipe(RECIPES / f"{arm}.yaml")
    scores, residual = ARMS[arm]
    assert recipe.name == f"autobot_{arm}" and recipe.model.name == "resnet20" and recipe.compact
    assert recipe.train.checkpoint == "benchmarks/checkpoints/resnet20_cifar10_step30"
    assert (ROOT / recipe.train.checkpoint / "model.json").is_file()
    assert recipe.data.data_dir == "../shared/data" and recipe.data.batch_size == 256
    p = recipe.prune
    assert (p.method, p.target, p.scores, p.residual, p.threshold) == ("autobot", "macs=0.55", scores, residual,
                                                                       "closest")
    assert (p.lr, p.beta, p.gamma, p.batches, p.batch_size) == (0.5, 6, 0.2, 200, 64)
    r = recipe.retrain
    assert (r.epochs, r.optimizer, r.lr, r.momentum, r.nesterov, r.weight_decay, r.lr_plan) == (
        5, "sgd", 0.02, 0.9, False, 0.002, "cosine")
    before = load_recipe(RECIPES / f"{arm}.yaml", ["retrain=null", f"name=autobot_{arm}_before", "seeds=[1]"])
    assert before.retrain is None and before.prune == recipe.prune and before.seeds == [1]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="CIFAR-10 is not in ../shared/data")
def test_the_scatter_recipe_runs_prune_fine_tune_compact_evaluate_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names the checkpoint relative to the repository root
    recipe = load_recipe(RECIPES / "scatter.yaml", [f"data.data_dir={SHARED_DATA}", "data.subset=256",
                                                    "prune.batches=4", "retrain.epochs=1", "export.onnx=true"])
    row = run_recipe(recipe, tmp_path)[0]
    run = Path(row["run_dir"])
    prune = json.loads((run / "prune" / "stage.json").read_text())
    assert prune["macs_after"] == prune["macs_internal"] <= prune["target_macs"] == round(0.45 * 40_932_032)
    assert prune["gate_steps"] == 4 and prune["residual"] == "scatter"
    model, spec = load_artifact(run / "final")
    assert [t["name"] for t in spec.transforms] == ["scatter_residual"]
    assert row["macs"] == count_macs(model, spec.input_shape).total == prune["macs_after"]
    assert (run / "export" / "model.onnx").is_file()
