"""AutoBot's differentiable MACs: equal to the counter on the pruned model for 0/1 gates, every placement."""

from __future__ import annotations

import copy

import pytest
import torch

from gate_helpers import X, random_gates, random_masks, trained_like
from prunekit.core.gate_costs import GateCosts
from prunekit.core.gates import gate_values, insert_gates, remove_gates
from prunekit.core.scatter import prune_channels
from prunekit.measure.macs import count_macs
from prunekit.models import build_model

SMALL = torch.zeros(1, 3, 64, 64)  # torchvision models: any size counts the same way, 64 px keeps it fast
SLOW = pytest.mark.slow
CASES = [("resnet20", "scatter", X), ("resnet20", "keep", X), ("resnet56", "scatter", X), ("resnet56", "keep", X),
         pytest.param("vgg16_bn", "coupled", X, marks=SLOW), pytest.param("mobilenetv2", "coupled", X, marks=SLOW),
         ("tv:resnet18", "coupled", SMALL), pytest.param("tv:resnet50", "coupled", SMALL, marks=SLOW),
         ("tv:mobilenet_v2", "coupled", SMALL)]
IDS = ["resnet20-scatter", "resnet20-keep", "resnet56-scatter", "resnet56-keep", "vgg16_bn", "mobilenetv2",
       "tv-resnet18", "tv-resnet50", "tv-mobilenet_v2"]


def _setup(name: str, residual: str, x: torch.Tensor):
    model = trained_like(name) if not name.startswith("tv:") else build_model(name).eval()
    costs = GateCosts.build(model, x, scatter=residual == "scatter")
    gated = insert_gates(copy.deepcopy(model), x, residual=residual)
    return model, costs, gated


@pytest.mark.parametrize("name, residual, x", CASES, ids=IDS)
def test_soft_macs_of_zero_one_gates_equal_the_counter_on_the_pruned_model(name, residual, x):
    model, costs, gated = _setup(name, residual, x)
    assert costs.dense_macs() == count_macs(model, x).total
    values = gate_values(gated)
    assert float(costs.soft_macs({r: torch.ones_like(v) for r, v in values.items()})) == costs.dense_macs()
    masks = random_masks(values, seed=len(name))
    pruned, _ = prune_channels(remove_gates(gated), {r: m.nonzero().flatten() for r, m in masks.items()}, x,
                               scatter=residual == "scatter", verify=False)
    counted = count_macs(pruned, x).total
    assert counted < costs.dense_macs()
    assert costs.macs(masks) == counted
    assert float(costs.soft_macs({r: m.double() for r, m in masks.items()})) == pytest.approx(counted, abs=1e-3)


def test_resnet56_dense_macs_are_the_papers():
    assert GateCosts.build(build_model("resnet56"), X, scatter=True).dense_macs() == 126_554_816


@pytest.mark.parametrize("residual", ["scatter", "keep"])
def test_soft_macs_are_multilinear_with_exact_gradients(residual):
    """F is affine in each gate: F(λ) = (1 − λ_c)·F(λ_c=0) + λ_c·F(λ_c=1), and ∂F/∂λ_c = F(λ_c=1) − F(λ_c=0)."""
    _, costs, gated = _setup("resnet20", residual, X)
    gates = {r: g.double() for r, g in random_gates(gate_values(gated), seed=4).items()}
    for root in ("layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv2") if residual == "scatter" else ("layer2.1.conv1",):
        at = {r: g.clone().requires_grad_(True) for r, g in gates.items()}
        soft = costs.soft_macs(at)
        soft.backward()
        ends = []
        for end in (0.0, 1.0):
            changed = {r: g.clone() for r, g in gates.items()}
            changed[root][3] = end
            ends.append(float(costs.soft_macs(changed)))
        value = float(gates[root][3])
        assert float(soft.detach()) == pytest.approx((1 - value) * ends[0] + value * ends[1], rel=1e-12)
        assert float(at[root].grad[3]) == pytest.approx(ends[1] - ends[0], rel=1e-9)
        assert ends[1] > ends[0]


def test_scatter_conv2_gates_change_only_conv2_and_bn2():
    """One conv2 channel of the first block costs its conv2 filter (16 inputs × 9 × 32²) and its BN (2 × 32²)."""
    _, costs, gated = _setup("resnet20", "scatter", X)
    ones = {r: torch.ones_like(v, dtype=torch.float64) for r, v in gate_values(gated).items()}
    off = {**ones, "layer1.0.conv2": torch.tensor([0.0] + [1.0] * 15, dtype=torch.float64)}
    assert costs.dense_macs() - costs.macs({r: v.bool() for r, v in off.items()}) == 16 * 9 * 1024 + 2 * 1024
    half_inputs = {**off, "layer1.0.conv1": torch.full((16,), 0.5, dtype=torch.float64)}
    conv1_half = costs.dense_macs() - float(costs.soft_macs({**ones, "layer1.0.conv1": half_inputs["layer1.0.conv1"]}))
    # conv2's removed filter now saves its 8 soft inputs only
    assert costs.dense_macs() - conv1_half - float(costs.soft_macs(half_inputs)) == pytest.approx(8 * 9 * 1024 + 2 * 1024)
