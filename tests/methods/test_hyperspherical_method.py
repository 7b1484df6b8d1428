"""The hyperspherical method (Pruning On-the-Fly, METHODS §1) on the plug-in interface, end to end."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from cli_runner import run_cli
from conftest import SHARED_DATA
from prunekit.artifact import load_artifact
from prunekit.core.energy import PrunedEnergyPenalty
from prunekit.core.hyperspherical import HSConv2d, recalibrate_bn, unit_rows
from prunekit.core.onthefly import prunable_layers
from prunekit.core.prune_once import prune_once
from prunekit.core.recovery import recovered
from prunekit.core.selection import keep_count
from prunekit.core.transforms import recorded
from prunekit.data import DataBundle, TensorLoader
from prunekit.errors import UserError
from prunekit.experiment.recipe import validate_prune
from prunekit.methods import MethodContext
from prunekit.methods.hyperspherical import Hyperspherical, PrunedEnergyHook, pick_lambda
from prunekit.models import build_model
from prunekit.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "lr_plan": "cosine", "precision": "fp32"}


def method(**keys) -> Hyperspherical:
    return validate_prune({"method": "hyperspherical", "ratio": 0.5, **keys})


def context() -> MethodContext:
    return MethodContext(0, (3, 32, 32), torch.device("cpu"))


def resnet20(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=10)


def zeros(model: nn.Module) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def expected_zeros(model: nn.Module, ratio: float, first_conv: str = "conv1") -> dict[str, int]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n = m.weight.numel()
            out[name] = 0 if name == first_conv else n - keep_count(n, ratio)
    return out


# ------------------------------------------------------------------------ the method alone
def test_prepare_converts_every_conv_and_records_the_transform():
    model = method().prepare(resnet20())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, HSConv2d) and not m.normalize_input for m in convs)
    assert recorded(model) == [{"name": "hyperspherical", "args": {"normalize_input": False}}]
    assert method(normalize_input=True).prepare(resnet20()).conv1.normalize_input
    standard = resnet20()
    assert method(convs="standard").prepare(standard) is standard and recorded(standard) == []


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_prune_bakes_and_leaves_exactly_the_top_k_zeros_first_conv_dense(ratio):
    model = method().prepare(resnet20())
    unit = {name: unit_rows(layer.weight.detach()) for name, layer in prunable_layers(model).items()}
    result = method(ratio=ratio).prune(model, context())
    pruned = result.model
    assert not any(isinstance(m, HSConv2d) for m in pruned.modules())
    assert [r["name"] for r in recorded(pruned)] == ["hyperspherical", "bake_hyperspherical"]
    assert zeros(pruned) == expected_zeros(pruned, ratio)
    assert set(result.masks.layers) == set(unit)
    for name, layer in prunable_layers(pruned).items():
        kept = layer.weight_mask.bool()
        magnitude = unit[name].abs()
        assert magnitude[kept].min() >= magnitude[~kept].max()  # the largest |ŵ| (rows of fc) survive
        if isinstance(layer, nn.Conv2d):  # a conv keeps the baked ŵ itself at its kept entries
            assert torch.equal(layer.weight[kept], unit[name][kept])
    summary = result.summary
    assert summary["sparsity_line"].startswith("sparse: ") and summary["classifier"] == "pruned"
    assert summary["prune_time_s"] > 0


def test_classifier_switch_and_global_scope():
    result = method(prune_classifier=False).prune(method().prepare(resnet20()), context())
    assert zeros(result.model)["fc"] == 0 and "fc" not in result.masks.layers
    result = method(scope="global").prune(method().prepare(resnet20()), context())
    total = sum(m.numel() for m in result.masks.masks().values())
    assert sum(int((~m.bool()).sum()) for m in result.masks.masks().values()) == total - keep_count(total, 0.5)


def test_standard_arm_is_magnitude_pruning_exactly_as_oneshot():
    ours = method(convs="standard", ratio=0.7).prune(resnet20(), context()).masks.masks()
    theirs = prune_once(resnet20(), torch.zeros(1, 3, 32, 32), target="weights=0.7", granularity="weight",
                        criterion="l1", include_first_conv=False, include_classifier=True).mask_set.masks()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name].bool(), theirs[name].bool()) for name in ours)


@pytest.mark.parametrize("mode", ["layer_mean", "filter_mean", "signed_abs_mean"])
def test_recovery_refills_the_baked_values_and_returns_no_masks(mode):
    model = method().prepare(resnet20())
    unit = {name: unit_rows(layer.weight.detach()) if isinstance(layer, HSConv2d) else layer.weight.detach().clone()
            for name, layer in prunable_layers(model).items()}
    reference = method(ratio=0.6).prune(method().prepare(resnet20()), context())
    result = method(ratio=0.6, recovery=mode).prune(model, context())
    assert result.masks is None  # saved masks would re-zero the constants on load
    layers = prunable_layers(result.model)
    for name, mask in reference.masks.masks().items():
        assert torch.allclose(layers[name].weight, recovered(unit[name], mask.bool(), mode), atol=1e-7)
    summary = result.summary
    assert summary["sparsity_line"].startswith(f"mask + constant ({mode}; neither dense nor sparse)")
    n = sum(w.numel() for w in unit.values())
    replaced = sum(w.numel() - keep_count(w.numel(), 0.6) for w in unit.values())
    assert summary["dense_bits"] == 32 * n and summary["replaced_fraction"] == replaced / n
    assert summary["storage_bits"] < summary["dense_bits"] or mode == "signed_abs_mean"


def test_refusals_are_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^convs: the model has no hyperspherical conv; .*convs: standard$"):
        method().prune(resnet20(), context())
    with pytest.raises(UserError, match=r"^convs: the model has hyperspherical convs"):
        method(convs="standard").prune(method().prepare(resnet20()), context())
    baked = method().prune(method().prepare(resnet20()), context()).model
    with pytest.raises(UserError, match=r"^convs: .*already baked"):
        method().prune(baked, context())
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False), nn.Flatten(),
                          nn.LazyLinear(2))
    with pytest.raises(UserError) as caught:
        method().prepare(no_bn)
    assert str(caught.value).startswith("convs: cannot make this Sequential hyperspherical (require_bn: no BatchNorm")
    assert "\n" not in str(caught.value)


def test_penalty_hook_refuses_an_unconverted_conv():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, bias=False),
                          nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    trainer = Trainer(model, *loaders(), TrainConfig(epochs=1, precision="fp32"),
                      hooks=[PrunedEnergyHook(1.0, 0.5)])
    with pytest.raises(UserError, match=r"^layers: '2' is a Conv2d; the penalty needs hyperspherical convs"):
        trainer.fit()


@pytest.mark.parametrize("keys, flag", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"sparsity": 1.0}, "sparsity"), ({"lam": -1.0}, "lam"),
    ({"recovery": "mean"}, "recovery"), ({"convs": "standard", "normalize_input": True}, "normalize_input"),
    ({"sparsity_ramp_shape": "zigzag"}, "sparsity_ramp_shape"), ({"scope": "layer"}, "scope"),
])
def test_bad_values_name_their_key(keys, flag):
    from prunekit.experiment.recipe import RecipeError

    with pytest.raises(RecipeError) as caught:
        method(**keys)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].path == f"prune.{flag}"


def test_pick_lambda_is_the_largest_within_half_a_point():
    table = {0.0: 0.900, 0.1: 0.903, 0.3: 0.896, 1.0: 0.8951, 3.0: 0.893, 10.0: 0.80}
    assert pick_lambda(table) == 1.0
    assert pick_lambda({0.0: 0.9, 0.1: 0.5}) == 0.0
    assert pick_lambda(table, tolerance=0.01) == 3.0
    with pytest.raises(UserError, match=r"^lam: the calibration needs the unpenalised run"):
        pick_lambda({0.1: 0.9})


# ------------------------------------------------------------------- the penalty in training
def loaders(n=96, batch_size=16):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    stats = dict(mean=(0.5,), std=(0.25,))
    return (TensorLoader(images, labels, batch_size=batch_size, shuffle=True, augment=False, **stats),
            TensorLoader(images, labels, batch_size=48, shuffle=False, augment=False, **stats))


def trained_energy(lam: float, epochs: int = 3):
    torch.manual_seed(0)
    chosen = method(lam=lam, sparsity=0.5)
    model = chosen.prepare(build_model("small_cnn", num_classes=3, in_channels=1))
    hook, = chosen.train_hooks(None)
    trainer = Trainer(model, *loaders(), TrainConfig(epochs=epochs, lr=0.05, precision="fp32"), hooks=[hook])
    result = trainer.fit()
    return trainer, result, hook


def test_penalty_joins_the_loss_and_drives_the_pruned_energy_down():
    _, plain, _ = trained_energy(0.0)
    trainer, penalised, hook = trained_energy(10.0)
    names = list(prunable_layers(trainer.model))
    assert names == ["features.1.0", "features.2.0", "fc"]
    for history in (plain.history, penalised.history):
        extra = history[-1].extra
        assert set(extra) == {"pruned_energy_mean", "penalty_lam", "penalty_sparsity",
                              *(f"pruned_energy/{n}" for n in names)}
        assert extra["pruned_energy_mean"] == pytest.approx(sum(extra[f"pruned_energy/{n}"] for n in names) / 3)
    final = penalised.history[-1].extra
    assert (final["penalty_lam"], final["penalty_sparsity"]) == (10.0, 0.5)
    # the logged energy is the penalty's own R_l at the end of training
    reference = PrunedEnergyPenalty(prunable_layers(trainer.model), 1.0, 0.5)
    _, energies = reference(1.0)
    assert [final[f"pruned_energy/{n}"] for n in names] == pytest.approx(energies.tolist(), rel=1e-6)
    assert final["pruned_energy_mean"] < 0.5 * plain.history[-1].extra["pruned_energy_mean"]
    # λ = 0 trains exactly as without the hook (it adds no term)
    torch.manual_seed(0)
    model = method().prepare(build_model("small_cnn", num_classes=3, in_channels=1))
    bare = Trainer(model, *loaders(), TrainConfig(epochs=3, lr=0.05, precision="fp32")).fit()
    assert [m.train_loss for m in bare.history] == [m.train_loss for m in plain.history]


def test_sparsity_and_lambda_ramps_follow_the_progress():
    chosen = method(lam=2.0, lam_ramp=0.5, sparsity=0.6, sparsity_ramp=0.5)
    hook, = chosen.train_hooks(None)
    torch.manual_seed(0)
    model = chosen.prepare(build_model("small_cnn", num_classes=3, in_channels=1))
    history = Trainer(model, *loaders(), TrainConfig(epochs=4, lr=0.05, precision="fp32"), hooks=[hook]).fit().history
    assert [m.extra["penalty_lam"] for m in history] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    assert [m.extra["penalty_sparsity"] for m in history] == pytest.approx([0.3, 0.6, 0.6, 0.6])


def test_a_classifier_left_dense_is_left_out_of_the_penalty():
    hook, = method(lam=1.0, prune_classifier=False).train_hooks(None)
    torch.manual_seed(0)
    model = method().prepare(build_model("small_cnn", num_classes=3, in_channels=1))
    trainer = Trainer(model, *loaders(), TrainConfig(epochs=1, lr=0.05, precision="fp32"), hooks=[hook])
    extra = trainer.fit().history[-1].extra
    assert {k for k in extra if k.startswith("pruned_energy/")} == {"pruned_energy/features.1.0",
                                                                     "pruned_energy/features.2.0"}


def tiny_data():
    train, test = loaders()
    return DataBundle(train, test, 3, (1, 8, 8), "tiny")


def test_bn_recalibration_is_a_labelled_extra_that_leaves_the_saved_model_alone():
    torch.manual_seed(0)
    chosen = method(bn_recalibration=2)
    model = chosen.prepare(build_model("small_cnn", num_classes=3, in_channels=1))
    Trainer(model, *loaders(), TrainConfig(epochs=1, lr=0.05, precision="fp32")).fit()
    data = tiny_data()
    ctx = MethodContext(0, (1, 8, 8), torch.device("cpu"), data_factory=lambda **changes: data)
    plain = method().prune(copy.deepcopy(model), ctx)
    result = chosen.prune(model, ctx)
    bn = {n: b.running_mean.clone() for n, b in plain.model.named_modules() if isinstance(b, nn.BatchNorm2d)}
    assert all(torch.equal(b.running_mean, bn[n]) for n, b in result.model.named_modules() if n in bn)
    twin = copy.deepcopy(plain.model)
    recalibrate_bn(twin, data.train, 2)
    assert not all(torch.equal(b.running_mean, bn[n]) for n, b in twin.named_modules() if n in bn)
    assert result.summary["test_acc_bn_recalibrated_extra"] == ctx.test_accuracy(twin)
    assert result.summary["bn_recalibration"].startswith("extra, not the headline figure")
    assert "test_acc_bn_recalibrated_extra" not in plain.summary


# ------------------------------------------------------------------ through the CLI, real data
def tiny_recipe(tmp_path: Path, **prune) -> Path:
    recipe = {"name": "hs_tiny", "model": "resnet20",
              "data": {"name": "cifar10", "data_dir": str(SHARED_DATA), "subset": 256, "batch_size": 128},
              "train": TRAIN, "prune": {"method": "hyperspherical", "sparsity": 0.5, "ratio": 0.7, **prune},
              "retrain": TRAIN}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One recipe run: dense HS training with the penalty, pruning at 0.7, a fine-tune with masks."""
    from prunekit.cli.main import main

    tmp = tmp_path_factory.mktemp("hs_run")
    assert main(["run", str(tiny_recipe(tmp)), "--out", str(tmp / "runs")]) == 0
    return next((tmp / "runs").glob("hs_tiny-*/s0"))


@pytest.mark.slow
def test_recipe_run_trains_hyperspherical_with_the_penalty_then_prunes_and_fine_tunes(run_dir):
    dense, _ = load_artifact(run_dir / "train")
    assert any(isinstance(m, HSConv2d) for m in dense.modules())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r["stage"] == "train")
    layers = list(prunable_layers(dense))
    assert {f"pruned_energy/{n}" for n in layers} <= set(train_row) and 0 < train_row["pruned_energy_mean"] < 1
    prune = json.loads((run_dir / "prune" / "stage.json").read_text())
    assert prune["method"] == "hyperspherical" and prune["target"] == "weights=0.7"
    assert 0 <= prune["test_acc_after_prune"] <= 1 and prune["pruned_layers"] == len(layers)
    pruned, _ = load_artifact(run_dir / "prune")
    assert zeros(pruned) == expected_zeros(pruned, 0.7)
    masks = load_file(run_dir / "prune" / "masks.safetensors")
    retrained, _ = load_artifact(run_dir / "retrain")
    modules = dict(retrained.named_modules())
    for name, mask in masks.items():  # fine-tuning held the pruned entries at zero
        assert torch.all(modules[name].weight[~mask.bool()] == 0)
    assert not torch.equal(modules["fc"].weight, dict(pruned.named_modules())["fc"].weight)  # it did train


@pytest.mark.slow
def test_prune_cli_on_the_trained_model(capsys, tmp_path, run_dir):
    code, out, err = run_cli(capsys, "prune", run_dir / "train", "--method", "hyperspherical", "--ratio", "0.5",
                             "--out", tmp_path / "p")
    assert code == 0, err
    summary = json.loads((tmp_path / "p" / "prune.json").read_text())
    model, _ = load_artifact(tmp_path / "p")
    assert zeros(model) == expected_zeros(model, 0.5)
    assert summary["realised_sparsity"] == pytest.approx(sum(expected_zeros(model, 0.5).values()) / sum(
        m.weight.numel() for n, m in prunable_layers(model).items()))
    assert summary["target"] == "weights=0.5" and summary["convs"] == "hyperspherical"
    # the method is inferred from --ratio; recovery leaves no masks and says mask + constant
    code, _, err = run_cli(capsys, "prune", run_dir / "train", "--ratio", "0.5", "--recovery", "layer_mean",
                           "--out", tmp_path / "r")
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "prune.json").read_text())
    assert summary["method"] == "hyperspherical" and "realised_sparsity" not in summary
    assert summary["sparsity_line"].startswith("mask + constant (layer_mean")
    assert not (tmp_path / "r" / "masks.safetensors").exists()
    recovered_model, _ = load_artifact(tmp_path / "r")
    assert zeros(recovered_model)["layer1.0.conv1"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.0"], "--ratio: expected a number in [0, 1), got 1.0"),
    (["--ratio", "0.5", "--lam", "-1"], "--lam: expected a number >= 0, got -1"),
    (["--ratio", "0.5", "--sparsity", "1"], "--sparsity: expected a number in [0, 1), got 1"),
    (["--ratio", "0.5", "--convs", "standard"], "convs: the model has hyperspherical convs"),
])
def test_prune_cli_bad_values_exit_2_with_one_line(capsys, tmp_path, run_dir, args, message):
    code, out, err = run_cli(capsys, "prune", run_dir / "train", *args, "--out", tmp_path / "x")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_recipe_with_a_negative_lambda_exits_2_with_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", tiny_recipe(tmp_path, lam=-0.5), "--out", tmp_path / "runs")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "prune.lam: expected a number >= 0, got -0.5" in lines[0], err


LOAD_AND_RUN = """
import sys, torch
from prunekit.artifact import load_artifact
model, _ = load_artifact(sys.argv[1])
torch.manual_seed(7)
with torch.no_grad():
    torch.save(model.eval()(torch.randn(4, 3, 32, 32)), sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "prune"])
def test_save_load_in_a_new_process_gives_identical_outputs(tmp_path, run_dir, stage):
    model, _ = load_artifact(run_dir / stage)
    torch.manual_seed(7)
    with torch.no_grad():
        here = model.eval()(torch.randn(4, 3, 32, 32))
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(run_dir / stage), str(tmp_path / "out.pt")],
                   check=True, env=env, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)
