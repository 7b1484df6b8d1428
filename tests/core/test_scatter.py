"""The scatter residual form: equals the 0/1-gated model, counted by the MAC counter, replays, exports."""

from __future__ import annotations

import copy

import pytest
import torch

from gate_helpers import X, probe, random_masks, trained_like
from prunekit.core.gates import gate_values, insert_gates, remove_gates, set_gates
from prunekit.core.compaction import apply_manifest
from prunekit.core.scatter import ScatterAdd, ScatterBlock, basic_blocks, prune_channels, scatter_residual
from prunekit.core.transforms import recorded, replay
from prunekit.errors import UserError
from prunekit.export import export_onnx
from prunekit.measure.macs import count_macs
from prunekit.models import build_model

BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def _pruned(seed: int = 1):
    """(0/1-gated ResNet-20 in the scatter placement, its physically pruned twin, the masks)."""
    gated = insert_gates(trained_like("resnet20"), X, residual="scatter")
    masks = random_masks(gate_values(gated), seed=seed)
    set_gates(gated, {root: m.float() for root, m in masks.items()})
    pruned = remove_gates(copy.deepcopy(gated))
    prune_channels(pruned, {root: m.nonzero().flatten() for root, m in masks.items()}, X, scatter=True)
    return gated, pruned, masks


@pytest.mark.parametrize("seed", [1, 2])
def test_scatter_form_computes_the_zero_one_gated_model(seed):
    gated, pruned, masks = _pruned(seed)
    x = probe(seed)
    with torch.no_grad():
        assert torch.allclose(pruned(x), gated(x), atol=1e-5)
    for block in BLOCKS:
        module = pruned.get_submodule(block)
        kept = int(masks[f"{block}.conv2"].sum())
        assert isinstance(module, ScatterBlock)
        assert module.conv2.out_channels == module.bn2.num_features == kept
        assert module.conv1.out_channels == int(masks[f"{block}.conv1"].sum())
        assert module.scatter.index.tolist() == masks[f"{block}.conv2"].nonzero().flatten().tolist()
    assert pruned.fc.in_features == 64  # the residual stream keeps its width
    with torch.no_grad():
        assert pruned.layer3[2](torch.randn(1, 64, 8, 8)).shape == (1, 64, 8, 8)


def test_the_mac_counter_counts_the_scatter_form():
    """conv2/bn2 count only their kept outputs (conv2 also its kept inputs), the scatter counts 0."""
    _, pruned, masks = _pruned()
    dense = {row.name: row.macs for row in count_macs(build_model("resnet20")).rows}
    rows = {row.name: row for row in count_macs(pruned).rows}
    expected = dict(dense)
    for block in BLOCKS:
        inner, out = (masks[f"{block}.conv{i}"].sum().item() for i in (1, 2))
        width = masks[f"{block}.conv2"].numel()
        expected[f"{block}.conv1"] = dense[f"{block}.conv1"] * inner // width
        expected[f"{block}.bn1"] = dense[f"{block}.bn1"] * inner // width
        expected[f"{block}.conv2"] = dense[f"{block}.conv2"] * out * inner // width ** 2
        expected[f"{block}.bn2"] = dense[f"{block}.bn2"] * out // width
        expected[f"{block}.scatter"] = 0
        assert rows[f"{block}.scatter"].type == "ScatterAdd"
    assert {name: row.macs for name, row in rows.items()} == expected
    assert count_macs(pruned).total == sum(expected.values()) < sum(dense.values())


def test_resnet56_dense_macs_and_a_full_scatter_change_nothing():
    model = build_model("resnet56")
    assert count_macs(model).total == 126_554_816
    x = probe()
    with torch.no_grad():
        reference = model.eval()(x)
        scatter_residual(model, {f"{name}.conv2": range(block.conv2.out_channels)
                                 for name, block in basic_blocks(model).items()})
        assert torch.allclose(model(x), reference, atol=1e-5)
    assert count_macs(model).total == 126_554_816
    assert not basic_blocks(model)  # every block is a ScatterBlock now


@pytest.mark.parametrize("manifest_first", [True, False])
def test_the_scatter_form_survives_replay_on_a_fresh_model(manifest_first):
    """Either order of re-compacting (manifest) and replaying the transform rebuilds the same model."""
    gated = insert_gates(trained_like("resnet20"), X, residual="scatter")
    masks = random_masks(gate_values(gated), seed=3)
    pruned, manifest = prune_channels(remove_gates(gated), {r: m.nonzero().flatten() for r, m in masks.items()}, X,
                                      scatter=True)
    assert [entry["name"] for entry in recorded(pruned)] == ["scatter_residual"]
    fresh = build_model("resnet20")
    if manifest_first:
        fresh = replay(apply_manifest(fresh, manifest, X), recorded(pruned))
    else:
        fresh = apply_manifest(replay(fresh, recorded(pruned)), manifest, X)
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [(n, p.shape) for n, p in pruned.named_parameters()]
    fresh.load_state_dict(pruned.state_dict())
    x = probe()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned.eval()(x))


@pytest.mark.slow
def test_the_scatter_form_exports_to_onnx(tmp_path):
    _, pruned, _ = _pruned()
    path = export_onnx(pruned, probe(), tmp_path / "scatter.onnx")  # raises unless onnxruntime matches
    assert path.is_file()


def test_scatter_add_adds_at_the_positions():
    into = torch.arange(8.0).view(1, 4, 1, 2)
    values = torch.ones(1, 2, 1, 2)
    out = ScatterAdd([1, 3])(values, into)
    assert out.flatten().tolist() == [0, 1, 3, 4, 4, 5, 7, 8]
    assert ScatterAdd([1, 3]).state_dict() == {}  # the indices come from the transform arguments


def test_bad_keep_sets_are_user_errors():
    with pytest.raises(UserError, match=r"keep: 'layer1.0.conv1' is not the conv2 of a CIFAR basic block"):
        scatter_residual(build_model("resnet20"), {"layer1.0.conv1": [0]})
    with pytest.raises(UserError, match=r"keep\['layer1.0.conv2'\]: expected sorted distinct indices in \[0, 16\)"):
        scatter_residual(build_model("resnet20"), {"layer1.0.conv2": [3, 1]})
    for bad in ([], [16], [-1, 2]):
        with pytest.raises(UserError, match="sorted distinct indices"):
            scatter_residual(build_model("resnet20"), {"layer1.0.conv2": bad})
    with pytest.raises(UserError, match="cannot compact layer 'layer1.0.conv2'"):  # without scatter: a group root
        prune_channels(build_model("resnet20"), {"layer1.0.conv2": torch.tensor([0, 1])}, X)
    model = scatter_residual(build_model("resnet20"), {"layer1.0.conv2": [0, 1]})
    with pytest.raises(UserError, match="not the conv2 of a CIFAR basic block"):  # already scattered
        scatter_residual(model, {"layer1.0.conv2": [0]})
