"""Cost model: table MACs equal the counter on the compacted model; soft gates; the recorded table."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from prunekit.core.compaction import compact
from prunekit.core.costs import CostModel, LayerCost
from prunekit.core.groups import ChannelGroup, channel_groups
from prunekit.core.targets import table_macs
from prunekit.errors import UserError
from prunekit.measure.macs import count_macs
from prunekit.models import MODELS, build_model

ZOO_INPUTS = {"small_cnn": (1, 8, 8)}
"""Input shape per zoo model (CIFAR models: 3 x 32 x 32)."""
SLOW_ZOO = {"resnet56", "resnet56_b", "resnet110", "resnet110_b", "vgg16_bn", "mobilenetv2", "resnet18"}
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "densenet121",
               "efficientnet_b0", "regnet_y_400mf", "squeezenet1_0", "googlenet", "alexnet", "convnext_tiny"]
"""Classifiers at 64 px: concatenations (densenet, googlenet, squeezenet), squeeze-excitation
(efficientnet, mobilenet_v3, regnet_y), grouped convs (regnet), linears over channels-last tokens
(convnext), adaptive pools that upsample (vgg11_bn, alexnet: 2x2 and 1x1 to 7x7 and 6x6)."""


def random_keep(groups: list[ChannelGroup], seed: int) -> dict[str, torch.Tensor]:
    """A random keep-set: most removable groups lose a random share of channels (at least one stays)."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        if group.blocked or torch.rand(1, generator=g) < 0.2:
            continue
        mask = torch.rand(group.channels, generator=g) < torch.rand(1, generator=g)
        mask[torch.randint(group.channels, (1,), generator=g)] = True
        keep[group.root] = mask
    return keep


def compacted_macs(model: nn.Module, keep: dict[str, torch.Tensor], x: torch.Tensor) -> int:
    """The oracle: count_macs on a copy compacted to ``keep`` by Torch-Pruning."""
    pruned = copy.deepcopy(model)
    compact(pruned, {name: mask.nonzero().flatten() for name, mask in keep.items()}, x, verify=False)
    return count_macs(pruned, x).total


def check_against_compaction(model: nn.Module, x: torch.Tensor, seeds=(0, 1, 2)) -> CostModel:
    groups = channel_groups(model, x)
    cost = CostModel.build(model, x, groups)
    assert cost.dense_macs() == count_macs(model, x).total
    assert any(not g.blocked for g in groups)
    for seed in seeds:
        keep = random_keep(groups, seed)
        assert keep and any(not m.all() for m in keep.values())
        assert cost.macs(keep) == compacted_macs(model, keep, x), f"seed {seed}"
    return cost


# ------------------------------------------------------------ every model
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ZOO else n
                                  for n in MODELS.names()])
def test_zoo_model_table_equals_the_counter_after_compaction(name):
    torch.manual_seed(0)
    shape = ZOO_INPUTS.get(name, (3, 32, 32))
    model = build_model(name, in_channels=shape[0])
    check_against_compaction(model, torch.randn(1, *shape))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet:FutureWarning")
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_table_equals_the_counter_after_compaction(name):
    torch.manual_seed(0)
    model = build_model(f"tv:{name}")
    check_against_compaction(model, torch.randn(1, 3, 64, 64))


def test_dense_counts_match_the_papers():
    """METHODS §0.1: CIFAR ResNet-56 = 126,554,816; HRank-style VGG-16 = 314,294,272."""
    x = torch.zeros(1, 3, 32, 32)
    assert CostModel.build(build_model("resnet56"), x).dense_macs() == 126_554_816
    assert CostModel.build(build_model("vgg16_bn"), x).dense_macs() == 314_294_272


# ------------------------------------------------------------ soft gates
@pytest.mark.parametrize("name, side", [("resnet20", 32), ("mobilenetv2", 32), ("tv:resnet18", 64),
                                        ("tv:densenet121", 64)])
def test_soft_macs_equal_macs_for_0_1_gates_and_have_exact_gradients(name, side):
    torch.manual_seed(0)
    model, x = build_model(name), torch.zeros(1, 3, side, side)
    cost = CostModel.build(model, x)
    for seed in (0, 1):
        keep = random_keep(cost.groups, seed)
        gates = {root: mask.double().requires_grad_() for root, mask in keep.items()}
        soft = cost.soft_macs(gates)
        assert soft.dtype == torch.float64 and round(soft.item()) == cost.macs(keep)
        soft.backward()
        # MACs are linear in each single gate, so a gate's gradient is the MACs of its channel
        # in the current keep-set: soft(gate = 1) - soft(gate = 0), every one of them positive
        root = next(iter(gates))
        for channel in torch.randperm(keep[root].numel(), generator=torch.Generator().manual_seed(seed))[:4]:
            values = {r: g.detach().clone() for r, g in gates.items()}
            values[root][channel] = 1.0
            on = cost.soft_macs(values).item()
            values[root][channel] = 0.0
            off = cost.soft_macs(values).item()
            assert gates[root].grad[channel].item() == pytest.approx(on - off, rel=1e-9)
        assert all((g.grad > 0).all() for g in gates.values())


def test_soft_macs_of_fractional_gates_count_fractional_channels():
    """One conv 3->4 (k=3, 8x8 out, no bias) feeding a linear: gates 0.5 count as half a channel."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 64, 2))
    cost = CostModel.build(model, torch.zeros(1, 3, 8, 8))
    gates = {"0": torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64)}
    channels = 2.0
    assert cost.soft_macs(gates).item() == pytest.approx(channels * 64 * 27 + channels * 64 * 2)


# ------------------------------------------------------------ what the table records
class Branches(nn.Module):
    """A concatenation of two convs, a non-affine BN and a pool over it, then a flatten into a linear;
    ``a`` is called twice (weights shared), the pool twice on different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.norm = nn.BatchNorm2d(10, affine=False)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.mix = nn.Conv2d(10, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(5 * 2 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x) + self.a(x.flip(-1)), self.b(x)], 1)  # 10 x 8 x 8
        y = self.pool(self.act(self.norm(y)))                          # 10 x 4 x 4
        y = self.pool(self.mix(y))                                     # 5 x 2 x 2
        return self.fc(torch.flatten(y, 1))


def branches_macs(ka: int, kb: int, km: int) -> int:
    """thop MACs of Branches compacted to ka, kb, km filters of a, b, mix (by hand)."""
    return (2 * ka * 64 * (3 * 9 + 1) + kb * 64 * 3 + 2 * (ka + kb) * 64 + (ka + kb) * 16
            + km * 16 * (ka + kb) * 9 + km * 4 + km * 4 * 7)


def test_table_records_channels_groups_and_controllers():
    model, x = Branches(), torch.randn(1, 3, 8, 8)
    cost = CostModel.build(model, x)
    rows = {(row.name, row.spatial): row for row in cost.layers}
    assert rows["a", 64] == LayerCost("a", "Conv2d", 3, 6, 1, 9, 64, True, True, 2, ("a",), ())
    assert rows["b", 64] == LayerCost("b", "Conv2d", 3, 4, 1, 1, 64, False, True, 1, ("b",), ())
    assert rows["norm", 64] == LayerCost("norm", "BatchNorm2d", 10, 10, 1, 2, 64, False, False, 1, ("a", "b"), ())
    assert rows["pool", 16] == LayerCost("pool", "AvgPool2d", 10, 10, 1, 1, 16, False, False, 1, ("a", "b"), ())
    assert rows["pool", 4] == LayerCost("pool", "AvgPool2d", 5, 5, 1, 1, 4, False, False, 1, ("mix",), ())
    assert rows["mix", 16] == LayerCost("mix", "Conv2d", 10, 5, 1, 9, 16, False, True, 1, ("mix",), ("a", "b"))
    assert rows["fc", 1] == LayerCost("fc", "Linear", 20, 7, 1, 1, 1, False, True, 1, (), ("mix",))
    assert len(cost.layers) == 7
    assert cost.dense_macs() == branches_macs(6, 4, 5) == count_macs(model, x).total
    keep = {"a": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), "b": torch.tensor([0, 1, 0, 0], dtype=torch.bool),
            "mix": torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)}
    assert cost.macs(keep) == branches_macs(3, 1, 3) == compacted_macs(model, keep, x)


def test_built_groups_are_reused_and_table_macs_is_the_table():
    model, x = Branches(), torch.randn(1, 3, 8, 8)
    groups = channel_groups(model, x)
    cost = CostModel.build(model, x, groups)
    assert cost.groups == groups
    keep = {"mix": torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool)}
    assert table_macs(model, x, groups)(keep) == table_macs(model, x)(keep) == branches_macs(6, 4, 2)


class Shuffled(nn.Module):
    """A channel shuffle (view, transpose, view) before a pool the table cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y.view(1, 2, 4, 8, 8).transpose(1, 2).reshape(1, 8, 8, 8)
        return self.fc(torch.flatten(self.pool(y), 1))


def test_channels_the_table_cannot_follow_are_fixed_and_said(caplog):
    model, x = Shuffled(), torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="prunekit.core.costs"):
        cost = CostModel.build(model, x)
    assert "cannot follow the channels into AdaptiveAvgPool2d 'pool'" in caplog.text
    assert next(row for row in cost.layers if row.name == "pool").out_groups == ()
    assert cost.dense_macs() == count_macs(model, x).total
    assert next(g for g in cost.groups if g.root == "conv").blocked  # so the fixed pool is never wrong


# ------------------------------------------------------------ user mistakes
@pytest.fixture(scope="module")
def resnet20_costs() -> CostModel:
    return CostModel.build(build_model("resnet20"), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("keep, message", [
    ({"nope": torch.ones(16, dtype=torch.bool)}, "keep: 'nope' is not a Conv/Linear layer"),
    ({"layer1.0.conv1": torch.ones(15, dtype=torch.bool)}, "expected a boolean mask over its 16 output channels"),
    ({"layer1.0.conv1": torch.ones(16)}, "expected a boolean mask"),
    ({"layer1.0.conv1": torch.zeros(16, dtype=torch.bool)}, "would keep no channel"),
    ({"conv1": torch.arange(16) > 0}, "cannot compact layer 'conv1': coupled to an option-A"),
])
def test_bad_keep_sets_raise_one_line_user_errors(resnet20_costs, keep, message):
    with pytest.raises(UserError) as err:
        resnet20_costs.macs(keep)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_gates_raise_user_errors(resnet20_costs):
    with pytest.raises(UserError, match="expected a float gate"):
        resnet20_costs.soft_macs({"layer1.0.conv1": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(UserError, match="cannot compact layer 'conv1'"):
        resnet20_costs.soft_macs({"conv1": torch.ones(16)})


def test_residual_partners_must_agree():
    model, x = build_model("resnet20_b"), torch.zeros(1, 3, 32, 32)
    cost = CostModel.build(model, x)
    stream = next(g for g in cost.groups if "layer1.0.conv2" in g.out_layers)
    one, other = stream.out_layers[:2]
    keep = torch.arange(stream.channels) % 2 == 0
    assert cost.macs({one: keep, other: keep}) == cost.macs({one: keep}) == compacted_macs(model, {one: keep}, x)
    with pytest.raises(UserError, match="share their output channels"):
        cost.macs({one: keep, other: ~keep})
