"""Recipes with ``prune.method: filter_config`` (one-shot configured filter pruning, METHODS §2.3.1)
and weight rewinding (§2.4.2): real short runs on a CIFAR-10 subset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from conftest import SHARED_DATA
from exp_helpers import write_recipe
from prunekit.artifact import load_artifact
from prunekit.experiment.recipe import load_recipe
from prunekit.experiment.runner import run_recipe
from prunekit.experiment.store import ResultsStore
from prunekit.methods.filter_config import kept_counts
from prunekit.methods import plugins_for
from prunekit.models import build_model
from prunekit.train.hooks import Hook

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(),
                                reason="CIFAR-10 is not in ../shared/data")

RECIPE = {
    "name": "r20_cfg",
    "model": {"name": "resnet20"},
    "data": {"name": "cifar10", "data_dir": str(SHARED_DATA), "subset": 512, "batch_size": 128},
    "train": {"epochs": 2, "lr": 0.1, "lr_plan": "step", "precision": "fp32"},
    "prune": {"method": "filter_config", "config": "resnet20-B", "criterion": "l1"},
    "retrain": {"epochs": 1, "lr": 0.1, "lr_plan": "weight_rewind", "lr_plan_args": {"original_epochs": 2},
                "precision": "fp32"},
}
# resnet20-B: stage ratios 0.6/0.3/0.1 on block-first convs, conv ids 8, 14 and 18 kept whole
EXPECTED_KEPT = {"layer1.0.conv1": (6, 16), "layer1.1.conv1": (6, 16), "layer1.2.conv1": (6, 16),
                 "layer2.1.conv1": (22, 32), "layer2.2.conv1": (22, 32), "layer3.1.conv1": (57, 64)}


class StartingWeights(Hook):
    """Keeps the model's state when the retraining starts."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_begin(self, trainer) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def run(tmp_path, data, hooks_for=None, name="r.yaml"):
    recipe = load_recipe(write_recipe(tmp_path / name, data))
    (row,) = run_recipe(recipe, tmp_path / "runs", hooks_for=hooks_for)
    return recipe, row


def test_weight_rewinding_retrains_the_compacted_model_from_the_saved_epoch(tmp_path):
    start = StartingWeights()
    recipe, row = run(tmp_path, RECIPE, hooks_for=lambda stage: [start] if stage == "retrain" else [])
    run_dir = tmp_path / "runs" / row["run_id"]
    assert [e for p in plugins_for(recipe) for hook in p.train_hooks(recipe) for e in hook.epochs] == [1]
    snapshot = load_file(run_dir / "train" / "rewind" / "epoch-0001.safetensors")
    final_dense = load_file(run_dir / "train" / "model.safetensors")
    pruned, spec = load_artifact(run_dir / "prune")
    kept = {name: torch.tensor(layer["kept"]) for name, layer in spec.manifest["layers"].items()}
    assert {name: (len(k), layer["channels"]) for (name, layer), k in
            zip(spec.manifest["layers"].items(), kept.values())} == EXPECTED_KEPT
    # the retraining starts from the epoch-1 weights, sliced to the kept filters (an independent slicing)
    for name, value in start.state.items():
        saved = snapshot[name]
        layer = name.rsplit(".", 1)[0]
        block = layer.rsplit(".", 1)[0]
        conv1 = f"{block}.conv1"
        if conv1 in kept and (layer == conv1 or layer == f"{block}.bn1") and saved.dim() >= 1:
            saved = saved[kept[conv1]]
        elif conv1 in kept and layer == f"{block}.conv2":
            saved = saved[:, kept[conv1]]
        assert torch.equal(value, saved), name
    assert not torch.equal(start.state["layer3.2.conv2.weight"], final_dense["layer3.2.conv2.weight"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["params"] < result["dense_params"] and result["macs"] < result["dense_macs"]
    prune = json.loads((run_dir / "prune" / "stage.json").read_text())
    assert prune["params_removed"] == pytest.approx(1 - result["params"] / result["dense_params"])
    assert prune["filters_removed"] == sum(before - after for after, before in EXPECTED_KEPT.values())


def test_masked_and_compacted_filter_config_prune_alike_and_random_keeps_the_same_counts(tmp_path):
    base = {**RECIPE, "train": {**RECIPE["train"], "epochs": 1}, "retrain": None}
    base = {k: v for k, v in base.items() if v is not None}
    _, compacted = run(tmp_path, base, name="c.yaml")
    _, masked = run(tmp_path, {**base, "name": "r20_masked", "compact": False}, name="m.yaml")
    _, random = run(tmp_path, {**base, "name": "r20_random", "prune": {**base["prune"], "criterion": "random"}},
                    name="x.yaml")
    runs = tmp_path / "runs"
    stage = {name: json.loads((runs / row["run_id"] / "prune" / "stage.json").read_text())
             for name, row in (("c", compacted), ("m", masked), ("x", random))}
    assert stage["c"]["compacted"] and not stage["m"]["compacted"]
    one_image = 1.01 / json.loads((runs / compacted["run_id"] / "evaluate" / "stage.json").read_text())["test_samples"]
    assert stage["m"]["test_acc_after_prune"] == pytest.approx(stage["c"]["test_acc_after_prune"], abs=one_image)
    # compact: false keeps the dense shapes with the pruned filters (and their BN) zero: the same function
    assert masked["macs"] == masked["dense_macs"] > compacted["macs"]
    final = load_file(runs / masked["run_id"] / "final" / "model.safetensors")
    for name, (kept, channels) in EXPECTED_KEPT.items():
        rows = final[f"{name}.weight"].flatten(1).abs().sum(1)
        bn = final[f"{name.replace('conv1', 'bn1')}.weight"]
        assert int((rows == 0).sum()) == int((bn == 0).sum()) == channels - kept, name
    assert masked["final_test_acc"] == pytest.approx(compacted["final_test_acc"], abs=one_image)
    _, l1_spec = load_artifact(runs / compacted["run_id"] / "final")
    _, random_spec = load_artifact(runs / random["run_id"] / "final")
    l1_kept = {name: layer["kept"] for name, layer in l1_spec.manifest["layers"].items()}
    random_kept = {name: layer["kept"] for name, layer in random_spec.manifest["layers"].items()}
    assert {n: len(k) for n, k in l1_kept.items()} == {n: len(k) for n, k in random_kept.items()}
    assert l1_kept != random_kept
    rows = {row["run_id"]: row for row in ResultsStore(runs / "results.sqlite").rows()}
    assert rows[random["run_id"]]["target"] == "config=resnet20-B (random)"
    assert rows[random["run_id"]]["method"] == "filter_config" and rows[random["run_id"]]["granularity"] == "filter"


def test_counts_match_the_configuration_on_the_model_itself():
    model = build_model("resnet20", num_classes=10)
    assert kept_counts(model, "resnet20-B") == EXPECTED_KEPT


def test_weight_rewind_from_a_checkpoint_without_that_point_is_one_line(capsys, tmp_path):
    dense = tmp_path / "dense"
    model = build_model("resnet20", num_classes=10)
    from prunekit.artifact import ModelSpec, save_artifact

    save_artifact(model, ModelSpec(model="resnet20", num_classes=10, in_channels=3, input_shape=(3, 32, 32),
                                   data="cifar10"), dense)
    data = {**RECIPE, "train": {"checkpoint": str(dense)}}
    file = write_recipe(tmp_path / "w.yaml", data)
    code, _, err = run_cli(capsys, "run", file, "--out", tmp_path / "runs")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("prunekit run: error: retrain.lr_plan: weight_rewind with epochs=1 needs the weights "
                          "after original epoch 1"), err
    assert not (tmp_path / "runs").exists()


def test_weight_rewinding_a_masked_model_keeps_its_zeros(tmp_path):
    from exp_helpers import TINY, recipe

    data = recipe(TINY, retrain={"epochs": 1, "optimizer": "adamw", "lr": 1.0e-3, "lr_plan": "weight_rewind",
                                 "lr_plan_args": {"original_epochs": 2}, "precision": "fp32"})
    start = StartingWeights()
    _, row = run(tmp_path, data, hooks_for=lambda stage: [start] if stage == "retrain" else [], name="t.yaml")
    run_dir = tmp_path / "runs" / row["run_id"]
    snapshot = load_file(run_dir / "train" / "rewind" / "epoch-0001.safetensors")
    masks = load_file(run_dir / "prune" / "masks.safetensors")
    assert masks and sorted(p.name for p in (run_dir / "train" / "rewind").iterdir()) == ["epoch-0001.safetensors"]
    for name, value in start.state.items():
        layer = name.rsplit(".", 1)[0]
        expected = snapshot[name] * masks[layer] if name.endswith("weight") and layer in masks else snapshot[name]
        assert torch.equal(value, expected), name
    assert all(int((start.state[f"{layer}.weight"] == 0).sum()) >= int((mask == 0).sum())
               for layer, mask in masks.items())
