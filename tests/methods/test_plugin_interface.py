"""A method defined only here runs through ``prunekit run`` and ``prunekit prune`` unchanged."""

from __future__ import annotations

import json
import math
from typing import Literal

import pytest
import torch
from pydantic import field_validator

import yaml

from cli_runner import run_cli
from prunekit.artifact import load_artifact
from prunekit.core.masks import MaskSet
from prunekit.core.layers import filter_prunable_layers
from prunekit.methods import METHODS, Method, MethodContext, PruneResult, register_method
from prunekit.models import build_model


class KeepLeading(Method):
    """Toy method: every removable group keeps its first ``share`` of filters (rounded up)."""

    method: Literal["keep_leading"]
    share: float = 0.5

    @field_validator("share")
    @classmethod
    def _fraction(cls, share: float) -> float:
        if not 0 < share <= 1:
            raise ValueError(f"expected a share in (0, 1], got {share!r}")
        return share

    def prune(self, model: torch.nn.Module, ctx: MethodContext) -> PruneResult:
        modules = dict(model.named_modules())
        masks = {}
        for name in filter_prunable_layers(model, ctx.example_input()):
            weight = modules[name].weight
            mask = torch.zeros_like(weight, dtype=torch.bool)
            mask[: math.ceil(weight.shape[0] * self.share)] = True
            masks[name] = mask
        return PruneResult(model, masks=MaskSet.attach(model, masks, "filter"), summary={"share": self.share})


@pytest.fixture
def toy_method():
    register_method("keep_leading")(KeepLeading)
    yield KeepLeading
    METHODS.unregister("keep_leading")


def widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_a_method_registered_in_a_test_runs_through_prunekit_run(capsys, tmp_path, toy_method):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": "small_cnn", "data": {"name": "digits", "batch_size": 64},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 3e-3, "precision": "fp32"},
        "prune": {"method": "keep_leading", "share": 0.25},
        "retrain": {"epochs": 1, "optimizer": "adamw", "lr": 1e-3, "precision": "fp32"}}))
    code, out, err = run_cli(capsys, "run", path, "--out", tmp_path / "runs")
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").glob("tiny-*/s0")
    prune = json.loads((run_dir / "prune" / "stage.json").read_text())
    assert prune["method"] == "keep_leading" and prune["share"] == 0.25 and prune["compacted"]
    final, spec = load_artifact(run_dir / "final")
    dense = build_model("small_cnn", num_classes=10, in_channels=1)
    assert widths(final) == [-(-w // 4) for w in widths(dense)]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["macs"] < result["dense_macs"]


def test_a_method_registered_in_a_test_runs_through_prunekit_prune(capsys, tmp_path, toy_method):
    trained = tmp_path / "dense"
    assert run_cli(capsys, "train", "--model", "small_cnn", "--data", "digits", "--epochs", "1",
                   "--out", trained)[0] == 0
    code, out, err = run_cli(capsys, "prune", trained, "--share", "0.5", "--out", tmp_path / "p")  # method inferred
    assert code == 0, err
    pruned, _ = load_artifact(tmp_path / "p")
    dense, _ = load_artifact(trained)
    assert widths(pruned) == [-(-w // 2) for w in widths(dense)]
    code, _, err = run_cli(capsys, "prune", trained, "--method", "keep_leading", "--share", "2", "--out", tmp_path / "q")
    assert code == 2 and err.strip().splitlines() == ["prunekit prune: error: --share: expected a share in (0, 1], "
                                                      "got 2.0"], err
    assert not (tmp_path / "q").exists()
