import json

import pytest
import torch
from safetensors.torch import load_file

from prunekit.artifact import load_artifact
from cli_runner import run_cli
from prunekit.cli.main import main
from prunekit.data import build_data
from prunekit.measure import count_macs
from prunekit.measure.accuracy import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_macs_target_is_met_and_model_is_compacted(capsys, tmp_path, trained):
    code, out, err = run_cli(capsys, "prune", trained, "--target", "macs=0.5", "--scope", "global",
                             "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "prune.json").read_text())
    assert summary["compacted"] and summary["macs_after"] <= 0.5 * summary["macs_before"]
    assert summary["macs_after"] >= 0.45 * summary["macs_before"]  # within a few filters of the budget
    model, spec = load_artifact(tmp_path)
    assert spec.manifest is not None
    assert count_macs(model, spec.input_shape).total == summary["macs_after"]
    dense, _ = load_artifact(trained)
    layers = spec.manifest["layers"]
    assert {name: layer["channels"] for name, layer in layers.items()} == {"features.0.0": 32, "features.1.0": 64,
                                                                          "features.2.0": 64}  # all three shrank
    kept_in = torch.arange(1)  # the digits' one input channel
    for name in layers:  # each conv is the dense one's kept filters over the kept input channels
        kept = torch.tensor(layers[name]["kept"])
        assert 1 <= len(kept) == layers[name]["width"]
        conv, dense_conv = model.get_submodule(name), dense.get_submodule(name)
        assert torch.equal(conv.weight, dense_conv.weight[kept][:, kept_in]), name
        kept_in = kept
    assert torch.equal(model.fc.weight, dense.fc.weight[:, kept_in])


def test_a_target_missed_by_rounding_is_a_warning_with_the_achieved_value(capsys, caplog, tmp_path, trained):
    # widths 32, 64, 64 keep 16, 32, 32 at filters=0.5; rounded to multiples of 24: 24, 24, 24
    code, _, err = run_cli(capsys, "prune", trained, "--target", "filters=0.5", "--round-to", "24", "--out", tmp_path)
    assert code == 0, err
    assert "prune.target filters=0.5: achieved filters=0.5500, +0.0500 from the target (round_to=24)" in caplog.text
    summary = json.loads((tmp_path / "prune.json").read_text())
    assert summary["target_achieved"] == pytest.approx(0.55) and summary["target_met"] is False


def test_prune_no_compact_then_compact_gives_the_same_function(capsys, tmp_path, trained):
    assert run_cli(capsys, "prune", trained, "--target", "filters=0.5", "--no-compact", "--out", tmp_path / "m")[0] == 0
    masks = load_file(tmp_path / "m" / "masks.safetensors")
    assert {name: int(mask.flatten(1).any(1).sum()) for name, mask in masks.items()} == {"features.0.0": 16,
                                                                                         "features.1.0": 32,
                                                                       "features.2.0": 32}
    assert run_cli(capsys, "compact", tmp_path / "m", "--out", tmp_path / "c")[0] == 0
    masked, _ = load_artifact(tmp_path / "m")
    compacted, _ = load_artifact(tmp_path / "c")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(masked.eval()(x), compacted.eval()(x), atol=1e-5)
    assert count_macs(compacted, (1, 8, 8)).total < 0.3 * count_macs(masked, (1, 8, 8)).total


@pytest.mark.parametrize("scope", ["local", "global"])
def test_uncompacted_targets_are_checked_on_the_masks_not_the_dense_shapes(capsys, caplog, tmp_path, trained, scope):
    for target in ("macs=0.5", "filters=0.5"):
        code, _, err = run_cli(capsys, "prune", trained, "--target", target, "--scope", scope, "--no-compact",
                               "--out", tmp_path / target)
        assert code == 0, err
    assert "prune.target" not in caplog.text  # filters=0.5 is met on the filters, whatever the weights
    summary = json.loads((tmp_path / "filters=0.5" / "prune.json").read_text())
    assert summary["target_achieved"] == pytest.approx(0.5) and summary["target_met"] is True


def test_unstructured_target_is_exact_and_leaves_shapes(capsys, tmp_path, trained):
    assert run_cli(capsys, "prune", trained, "--target", "weights=0.9", "--granularity", "weight",
                   "--out", tmp_path)[0] == 0
    model, _ = load_artifact(tmp_path)
    for layer in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        assert int((layer.weight == 0).sum()) == layer.weight.numel() - round(0.1 * layer.weight.numel())
    code, _, err = run_cli(capsys, "compact", tmp_path, "--out", tmp_path / "c")
    assert code == 2 and "holds no filter masks" in err


def test_inspect_reports_layers_totals_and_latency(capsys, tmp_path, trained):
    run_cli(capsys, "prune", trained, "--target", "filters=0.5", "--out", tmp_path)
    code, out, _ = run_cli(capsys, "inspect", tmp_path, "--repeats", "3")
    assert code == 0
    for text in ("features.1.0", "64x32x3x3 -> 32x16x3x3", "MACs", "latency b32 fp32"):
        assert text in out


@pytest.mark.parametrize("args, message", [
    (["--target", "0.5"], "needs a unit"),
    (["--target", "macs=50"], "write macs=0.5 for 50%"),
    (["--target", "flops=0.5"], "unknown unit 'flops'"),
    (["--target", "macs=0.5", "--granularity", "weight"], "needs granularity filter"),
    (["--target", "filters=0.5", "--criterion", "taylor"], "--criterion: taylor needs data"),
    (["--target", "filters=0.5", "--granularity", "blocks"], "unknown granularity 'blocks'"),
])
def test_bad_prune_arguments_are_one_line_errors(capsys, tmp_path, trained, args, message):
    code, _, err = run_cli(capsys, "prune", trained, *args, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_export_writes_a_checked_onnx_file(capsys, tmp_path, trained):
    run_cli(capsys, "prune", trained, "--target", "filters=0.5", "--out", tmp_path / "p")
    code, out, err = run_cli(capsys, "export", tmp_path / "p", "--onnx", tmp_path / "m.onnx")
    assert code == 0, err
    assert (tmp_path / "m.onnx").stat().st_size > 1000 and "checked against PyTorch" in out


@pytest.fixture(scope="module")
def resnet20_dir(tmp_path_factory):
    from prunekit.artifact import ModelSpec, save_artifact
    from prunekit.models import build_model

    out = tmp_path_factory.mktemp("resnet20")
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so masked BN must really be zeroed to match
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.5, 0.5)
    save_artifact(model, ModelSpec(model="resnet20", num_classes=10, in_channels=3, input_shape=(3, 32, 32),
                                   data="cifar10"), out)
    return out


RESNET20_B = {"layer1.0.conv1": 6, "layer1.1.conv1": 6, "layer1.2.conv1": 6, "layer2.1.conv1": 22,
              "layer2.2.conv1": 22, "layer3.1.conv1": 57}


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_config_prunes_the_configured_counts_masked_or_compacted_alike(capsys, tmp_path, resnet20_dir, criterion):
    code, out, err = run_cli(capsys, "prune", resnet20_dir, "--config", "resnet20-B", "--criterion", criterion,
                             "--out", tmp_path / "c")
    assert code == 0 and f"config=resnet20-B ({criterion})" in out, err
    compacted, spec = load_artifact(tmp_path / "c")
    assert {name: len(layer["kept"]) for name, layer in spec.manifest["layers"].items()} == RESNET20_B
    assert run_cli(capsys, "prune", resnet20_dir, "--config", "resnet20-B", "--criterion", criterion,
                   "--no-compact", "--out", tmp_path / "m")[0] == 0
    masks = load_file(tmp_path / "m" / "masks.safetensors")
    assert {name: int(mask.flatten(1).any(1).sum()) for name, mask in masks.items()} == RESNET20_B
    masked, _ = load_artifact(tmp_path / "m")
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(masked.eval()(x), compacted.eval()(x), rtol=1e-4, atol=1e-4)
    dense, _ = load_artifact(resnet20_dir)
    kept = {name: layer["kept"] for name, layer in spec.manifest["layers"].items()}
    if criterion == "l1":  # the largest L1 norms, as the paper ranks them
        weight = dict(dense.named_modules())["layer3.1.conv1"].weight
        top = weight.abs().sum((1, 2, 3)).topk(57).indices.sort().values.tolist()
        assert kept["layer3.1.conv1"] == top


@pytest.mark.parametrize("args, message", [
    (["--config", "resnet20-B", "--scope", "global"], "--scope: not a key of method filter_config"),
    (["--config", "resnet20-B", "--round-to", "8"], "--round-to: not a key of method filter_config"),
    (["--config", "resnet56-B"], "config: made for ResNet-56"),
    (["--config", "resnet20-B", "--target", "filters=0.5"], "--method: name the method"),
    (["--config", "resnet21-B"], "--config: unknown filter-pruning configuration 'resnet21-B'"),
])
def test_bad_config_arguments_are_one_line_errors(capsys, tmp_path, resnet20_dir, args, message):
    code, _, err = run_cli(capsys, "prune", resnet20_dir, *args, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_sweep_prunes_at_every_value_and_plots_the_curves(capsys, tmp_path, trained):
    code, out, err = run_cli(capsys, "prune", trained, "--granularity", "weight", "--sweep",
                             "target=weights=0.3,weights=0.9", "--out", tmp_path / "s")
    assert code == 0, err
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [row["target"] for row in sweep["rows"]] == ["weights=0.3", "weights=0.9"]
    for row, fraction in zip(sweep["rows"], (0.3, 0.9)):
        assert row["realised_sparsity"] == pytest.approx(fraction, abs=1e-3)
        pruned, _ = load_artifact(tmp_path / "s" / f"target=weights={fraction}")
        accuracy = evaluate(pruned, build_data("digits").test, device=torch.device("cpu"), precision="fp32").accuracy
        assert accuracy == row["test_acc_after_prune"]  # each value's model is the one measured
    assert sweep["rows"][0]["test_acc_after_prune"] > sweep["rows"][1]["test_acc_after_prune"]
    code, _, err = run_cli(capsys, "prune", trained, "--granularity", "weight", "--sweep", "target=weights=0.5",
                           "--plot", tmp_path / "curve.png", "--plot-with", tmp_path / "s" / "sweep.json",
                           "--out", tmp_path / "t")
    assert code == 0, err
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--sweep", "target"], "--sweep: expected KEY=V1,V2,..."),
    (["--sweep", "target=weights=0.5,weights=1.5"], "--target: weights expects a fraction removed in [0, 1]"),
    (["--target", "weights=0.5", "--plot", "x.png"], "--plot: draws a --sweep"),
    (["--sweep", "target=weights=0.5", "--plot", "x.gif"], "--plot: expected a file name ending in"),
])
def test_bad_sweeps_are_one_line_errors_and_write_nothing(capsys, tmp_path, trained, args, message):
    code, _, err = run_cli(capsys, "prune", trained, "--granularity", "weight", *args, "--out", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_channel_masks_are_never_compacted_as_if_they_were_filters(capsys, tmp_path, trained):
    """Channel masks select input channels; compacting them as output channels was silently wrong."""
    code, _, err = run_cli(capsys, "prune", trained, "--granularity", "channel", "--target", "filters=0.5",
                           "--out", tmp_path / "c")
    assert code == 2 and err.strip().splitlines() == [
        "prunekit prune: error: --granularity: channel pruning selects input channels, which compaction cannot "
        "remove (it removes filters); use filter"], err
    from prunekit.core.masks import MaskSet
    from prunekit.errors import UserError
    model, _ = load_artifact(trained)
    conv = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    weight = dict(model.named_modules())[conv].weight
    channel_masks = MaskSet.attach(model, {conv: torch.ones_like(weight, dtype=torch.bool)}, "channel")
    with pytest.raises(UserError, match="only filter masks can be compacted"):
        channel_masks.keep_indices()
