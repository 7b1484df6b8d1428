"""A damaged or absurd saved model is one line naming what is wrong, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run_cli
from prunekit.artifact import ModelSpec, save_artifact
from prunekit.core.compaction import compact
from prunekit.models import build_model


@pytest.fixture
def saved(tmp_path):
    save_artifact(build_model("small_cnn", in_channels=1),
                  ModelSpec(model="small_cnn", num_classes=10, in_channels=1, input_shape=(1, 8, 8), data="digits"),
                  tmp_path / "m")
    return tmp_path / "m"


def edit(directory, **changes):
    spec = directory / "model.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": 10**12}, "num_classes expects an integer in [1, 1,000,000], got 1000000000000"),
    ({"input_shape": [1, -8, 0]}, "input_shape expects positive integers"),
    ({"input_shape": [3, 8, 8]}, "input_shape [3, 8, 8] starts with 3 channels, in_channels is 1"),
])
def test_absurd_model_json_is_one_line(capsys, saved, changes, message):
    edit(saved, **changes)
    code, _, err = run_cli(capsys, "eval", saved)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: bytes(len(b))])
def test_truncated_or_random_weights_are_one_line(capsys, saved, damage):
    weights = saved / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for command in ("eval", "inspect", "export"):
        extra = ["--onnx", str(saved / "m.onnx")] if command == "export" else []
        code, _, err = run_cli(capsys, command, saved, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err, (command, err)


def test_manifest_errors_name_the_problem(capsys, tmp_path):
    model = build_model("resnet20")
    result = compact(model, {"layer1.0.conv1": torch.arange(8)}, torch.zeros(1, 3, 32, 32))
    save_artifact(result.model, ModelSpec(model="resnet20", num_classes=10), tmp_path, manifest=result.manifest)
    stored = json.loads((tmp_path / "model.json").read_text())
    layers = stored["manifest"]["layers"]
    edit(tmp_path, manifest={**stored["manifest"], "layers": {"layer1.0.conv1": {**layers["layer1.0.conv1"], "width": 9}}})
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "'width' 9 contradicts the 8 kept channels" in err, err
    edit(tmp_path, manifest={**stored["manifest"], "layers": {"nowhere.conv": layers["layer1.0.conv1"]}})
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "names layer 'nowhere.conv', which this CifarResNet does not have" in err, err


def test_a_save_killed_mid_way_over_an_older_model_leaves_no_model_json(capsys, saved, monkeypatch):
    from prunekit.core.masks import MaskSet

    def killed(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(MaskSet, "save", killed)
    model = build_model("small_cnn", in_channels=1)
    masks = MaskSet({"features.0.0": model.get_submodule("features.0.0")})
    with pytest.raises(KeyboardInterrupt):
        save_artifact(model, ModelSpec(model="small_cnn", num_classes=10, in_channels=1, input_shape=(1, 8, 8),
                                       data="digits"), saved, masks=masks)
    assert not (saved / "model.json").exists()  # new weights, no spec: refused, never read as the old model
    code, _, err = run_cli(capsys, "eval", saved)
    assert code == 2 and "has no model.json" in err, err
