"""Models whose layers were swapped or augmented save, and load in a new process, identically."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.core.gates import gates, insert_gates
from prunekit.core.hyperspherical import HSConv2d
from prunekit.core.transforms import apply_transform, recorded
from prunekit.errors import UserError
from prunekit.models import build_model

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LOAD = """
import sys, torch
from prunekit.artifact import load_artifact
model, _ = load_artifact(sys.argv[1])
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model.eval()(x), sys.argv[2])
"""


def swapped() -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_transform(build_model("resnet20"), "hyperspherical")


def gated() -> torch.nn.Module:
    torch.manual_seed(0)
    model = insert_gates(build_model("resnet20"), X[:1], residual="scatter")
    with torch.no_grad():
        for gate in gates(model).values():
            gate.alpha.uniform_(-3, 3)  # gate values other than the initial ones must come back
    return model


@pytest.mark.slow
@pytest.mark.parametrize("make", [swapped, gated])
def test_transformed_model_loads_identically_in_a_new_process(tmp_path, make):
    model = make().eval()
    save_artifact(model, ModelSpec(model="resnet20", num_classes=10), tmp_path / "m")
    assert load_artifact(tmp_path / "m")[1].transforms == recorded(model) != []
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m"), str(tmp_path / "out.pt")], check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), model(X))


def test_swapped_layers_are_rebuilt_as_their_own_type(tmp_path):
    model = swapped()
    save_artifact(model, ModelSpec(model="resnet20", num_classes=10), tmp_path / "m")
    loaded, _ = load_artifact(tmp_path / "m")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert sum(isinstance(m, HSConv2d) for m in loaded.modules()) == 19  # every conv of ResNet-20


def test_an_unknown_transform_in_model_json_is_one_line(tmp_path):
    save_artifact(build_model("small_cnn", in_channels=1), ModelSpec(model="small_cnn", num_classes=10, in_channels=1,
                                                                    input_shape=(1, 8, 8)), tmp_path / "m")
    spec = tmp_path / "m" / "model.json"
    spec.write_text(spec.read_text().replace('"transforms": []', '"transforms": [{"name": "warp", "args": {}}]'))
    with pytest.raises(UserError, match="unknown model transform 'warp'"):
        load_artifact(tmp_path / "m")
