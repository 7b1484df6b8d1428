"""Channel gates: init, placement, sharing, 0/1 gates = physical removal, removal, transform replay."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gate_helpers import X, probe, random_gates, random_masks, trained_like
from prunekit.core.gates import (ChannelGate, Gated, gate_values, gates, insert_gates, plan_gates,
                                 remove_gates, set_gates)
from prunekit.core.scatter import prune_channels
from prunekit.core.transforms import recorded, replay
from prunekit.errors import UserError
from prunekit.models import build_model

CASES = [("resnet20", "keep"), ("resnet20", "scatter"), ("vgg16_bn", "coupled"), ("mobilenetv2", "coupled"),
         ("tv:resnet18", "coupled"), ("resnet20_b", "coupled")]


def _gated(name: str, residual: str) -> tuple[nn.Module, nn.Module]:
    """(original, gated copy) of a trained-like model."""
    model = trained_like(name)
    return model, insert_gates(copy.deepcopy(model), X, residual=residual)


def _gated_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Gated)]


def test_gate_starts_at_logit_of_0_9():
    gate = ChannelGate(5, "conv")
    assert gate.alpha.detach().tolist() == pytest.approx([math.log(9)] * 5, abs=1e-6)
    assert math.log(9) == pytest.approx(2.197225, abs=1e-6)
    assert gate.value().tolist() == pytest.approx([0.9] * 5, abs=1e-7)
    x = torch.randn(2, 5, 3, 3)
    assert torch.allclose(gate(x), 0.9 * x)
    assert torch.allclose(gate(x[:, :, 0, 0]), 0.9 * x[:, :, 0, 0])  # after a BN1d


@pytest.mark.parametrize("name, residual", CASES)
def test_gates_at_one_change_nothing_and_at_init_they_act(name, residual):
    model, gated = _gated(name, residual)
    x = probe()
    with torch.no_grad():
        reference = model(x)
        assert not torch.allclose(gated(x), reference, atol=1e-3)  # λ = 0.9 everywhere
        set_gates(gated, {root: torch.ones_like(v) for root, v in gate_values(gated).items()})
        assert torch.equal(gated(x), reference)
    assert all(torch.equal(v, torch.ones_like(v)) for v in gate_values(gated).values())


@pytest.mark.parametrize("name, residual", CASES)
def test_zero_one_gates_compute_what_physical_removal_does(name, residual):
    """The pseudo-pruned model (exact 0/1 gates) is the compacted / scattered model."""
    model, gated = _gated(name, residual)
    masks = random_masks(gate_values(gated), seed=1)
    set_gates(gated, {root: m.float() for root, m in masks.items()})
    pruned, _ = prune_channels(model, {root: m.nonzero().flatten() for root, m in masks.items()}, X,
                               scatter=residual == "scatter")
    x = probe()
    with torch.no_grad():
        assert torch.allclose(pruned(x), gated(x), atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in trained_like(name).parameters())


def test_placement_on_cifar_resnets():
    """keep: block-internal channels (after bn1); scatter: also each conv2 after bn2; stem never."""
    model = build_model("resnet20")
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    keep = insert_gates(copy.deepcopy(model), X, residual="keep")
    assert _gated_modules(keep) == [f"{b}.bn1" for b in blocks]
    assert list(gates(keep)) == [f"{b}.conv1" for b in blocks]
    scatter = insert_gates(copy.deepcopy(model), X, residual="scatter")
    assert sorted(_gated_modules(scatter)) == sorted([f"{b}.bn{i}" for b in blocks for i in (1, 2)])
    assert list(gates(scatter)) == [f"{b}.conv{i}" for b in blocks for i in (1, 2)]  # module order
    assert insert_gates(copy.deepcopy(model), X, residual="coupled").state_dict().keys() == keep.state_dict().keys()
    option_b = build_model("resnet20_b")  # its residual width is prunable: keep leaves it whole
    assert list(gates(insert_gates(option_b, X, residual="keep"))) == [f"{b}.conv1" for b in blocks]


def test_vgg_gates_its_13_convs_and_not_the_hidden_linear():
    model = build_model("vgg16_bn")
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [entry["root"] for entry in plan_gates(model, X)] == convs and len(convs) == 13


def test_depthwise_chains_are_gated_once_after_the_depthwise_conv():
    gated = insert_gates(build_model("mobilenetv2"), X)
    names = _gated_modules(gated)
    assert "features.2.conv.1.1" in names and "features.2.conv.0.1" not in names  # dw BN, not the expand BN
    assert "features.0.1" not in names and "features.1.conv.0.1" in names  # stem -> first depthwise
    assert gates(gated)["features.2.conv.0.0"] is gated.features[2].conv[1][1].gate


def test_coupled_channels_share_one_parameter():
    gated = insert_gates(build_model("tv:resnet18"), X)
    stream = gated.bn1.gate
    assert stream is gated.layer1[0].bn2.gate is gated.layer1[1].bn2.gate and stream.root == "conv1"
    stage2 = gates(gated)["layer2.0.conv2"]
    assert stage2 is gated.layer2[0].downsample[1].gate is gated.layer2[1].bn2.gate
    alphas = [p for name, p in gated.named_parameters() if name.endswith("alpha")]
    assert len(alphas) == len(gates(gated)) == len({id(p) for p in alphas})
    scatter = insert_gates(build_model("resnet20"), X, residual="scatter")  # per-block conv2 vectors
    assert scatter.layer1[0].bn2.gate is not scatter.layer1[1].bn2.gate


def test_gating_after_bn_equals_gating_after_relu():
    """The paper gates after the ReLU; after the BN is the same for every λ >= 0."""
    model, gated = _gated("resnet20", "keep")
    values = random_gates(gate_values(gated), seed=3)
    set_gates(gated, values)
    handles = [model.get_submodule(root.replace("conv1", "relu1")).register_forward_hook(
        lambda m, a, out, lam=lam: out * lam.view(1, -1, 1, 1)) for root, lam in values.items()]
    x = probe()
    with torch.no_grad():
        assert torch.allclose(gated(x), model(x), atol=1e-6)
    for handle in handles:
        handle.remove()


def test_set_gates_rejects_bad_values():
    gated = insert_gates(build_model("resnet20"), X, residual="keep")
    with pytest.raises(UserError, match="'conv1' is not a gated group"):
        set_gates(gated, {"conv1": torch.ones(16)})
    with pytest.raises(UserError, match=r"gates\['layer1.0.conv1'\]: expected 16 values in \[0, 1\]"):
        set_gates(gated, {"layer1.0.conv1": torch.ones(15)})
    with pytest.raises(UserError, match="values in"):
        set_gates(gated, {"layer1.0.conv1": torch.full((16,), 1.5)})
    set_gates(gated, {"layer1.0.conv1": torch.full((16,), 0.25)})
    assert torch.allclose(gate_values(gated)["layer1.0.conv1"], torch.full((16,), 0.25))


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="residual: expected one of coupled, keep, scatter"):
        plan_gates(build_model("resnet20"), X, "full")
    with pytest.raises(UserError, match="residual: 'scatter' needs a CIFAR ResNet"):
        plan_gates(build_model("vgg16_bn"), X, "scatter")
    gated = insert_gates(build_model("resnet20"), X)
    with pytest.raises(UserError, match="already has gates"):
        insert_gates(gated, X)
    with pytest.raises(UserError, match="has no gates to remove"):
        remove_gates(build_model("resnet20"))


def test_remove_gates_restores_the_original_modules():
    model = trained_like("tv:resnet18")
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    reference = model(probe())
    insert_gates(model, X)
    assert recorded(model)[0]["name"] == "gates"
    set_gates(model, random_masks(gate_values(model)))  # the weights are never folded
    remove_gates(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert recorded(model) == [] and not gates(model)
    assert torch.equal(model(probe()), reference)


@pytest.mark.parametrize("name, residual", [("resnet20", "scatter"), ("tv:resnet18", "coupled")])
def test_gates_survive_transform_replay_and_deepcopy(name, residual):
    _, gated = _gated(name, residual)
    values = random_gates(gate_values(gated), seed=4)
    set_gates(gated, values)
    fresh = replay(build_model(name), recorded(gated))
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [(n, p.shape) for n, p in gated.named_parameters()]
    fresh.load_state_dict(gated.state_dict())
    x = probe()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), gated(x))
    twin = copy.deepcopy(gated)
    set_gates(twin, {root: torch.zeros_like(v) for root, v in values.items()})
    assert all(torch.allclose(gate_values(gated)[r], v) for r, v in values.items())  # the copy has its own gates
    assert all(torch.equal(v, torch.zeros_like(v)) for v in gate_values(twin).values())


def test_replay_checks_widths():
    plan = [{"root": "layer1.0.conv1", "channels": 8, "after": ["layer1.0.bn1"]}]
    with pytest.raises(UserError, match="'layer1.0.bn1' has 16 output channels, gate 'layer1.0.conv1' expects 8"):
        replay(build_model("resnet20"), [{"name": "gates", "args": {"groups": plan}}])
    with pytest.raises(UserError, match="no module 'layer9.bn1'"):
        replay(build_model("resnet20"), [{"name": "gates", "args": {"groups": [{**plan[0], "after": ["layer9.bn1"]}]}}])
