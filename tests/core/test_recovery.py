"""Mean recovery: each mode's documented values on a hand-made layer, storage cost, model-level fill."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.core.hyperspherical import HSConv2d
from prunekit.core.onthefly import prune_at_ratio
from prunekit.core.recovery import StorageCost, describe_cost, recover, recovered, storage_cost
from prunekit.errors import UserError

BEFORE = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, -0.1, 0.2, 6.0]])
MASK = torch.tensor([[True, False, True, False], [False, False, True, True]])  # pruned: -2, -4 | 0, -0.1


@pytest.mark.parametrize("mode, expected", [
    # μ = (-2 - 4 + 0 - 0.1)/4 = -1.525
    ("layer_mean", [[1.0, -1.525, 3.0, -1.525], [-1.525, -1.525, 0.2, 6.0]]),
    # row means of the pruned: -3 and -0.05
    ("filter_mean", [[1.0, -3.0, 3.0, -3.0], [-0.05, -0.05, 0.2, 6.0]]),
    # mean |pruned| = 6.1/4 = 1.525, with each entry's sign; sign(0) = 0 keeps the zero
    ("signed_abs_mean", [[1.0, -1.525, 3.0, -1.525], [0.0, -1.525, 0.2, 6.0]]),
])
def test_each_mode_fills_its_documented_values(mode, expected):
    torch.testing.assert_close(recovered(BEFORE, MASK, mode), torch.tensor(expected))


def test_conv_filters_use_their_own_means():
    before = torch.arange(1.0, 9.0).view(2, 1, 2, 2)
    mask = torch.tensor([[True, False], [False, True]]).expand(2, 1, 2, 2)
    out = recovered(before, mask, "filter_mean")
    assert out.flatten().tolist() == [1.0, 2.5, 2.5, 4.0, 5.0, 6.5, 6.5, 8.0]


@pytest.mark.parametrize("mode, cost, bits", [
    ("layer_mean", StorageCost(kept=4, constants=1, mask_bits=8, sign_bits=0), 5 * 32 + 8),
    ("filter_mean", StorageCost(kept=4, constants=2, mask_bits=8, sign_bits=0), 6 * 32 + 8),
    ("signed_abs_mean", StorageCost(kept=4, constants=1, mask_bits=8, sign_bits=4), 5 * 32 + 8 + 4),
])
def test_storage_cost_of_each_mode(mode, cost, bits):
    assert storage_cost(MASK, mode) == cost and cost.bits() == bits
    line = describe_cost({"a": cost, "b": cost}, mode)
    assert line.startswith(f"mask + constant ({mode}; neither dense nor sparse): 8 kept values + ")
    assert f"= {2 * bits:,} bits vs 512 dense" in line


def test_recover_fills_only_the_pruned_entries_of_the_model():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(BEFORE)
    before = {"2": model[2].weight.detach().clone()}
    masks = prune_at_ratio(model, 0.5)  # row-normalised ranking: row 1 is dominated by its 6
    assert torch.equal(masks["2"], torch.tensor([[False, True, True, True], [False, False, False, True]]))
    with torch.no_grad():
        model[2].weight[0, 1] = 7.0  # a kept entry changed (fine-tuned) stays as it is now
    costs = recover(model, masks, before, "layer_mean")
    mu = (1.0 + 0.0 - 0.1 + 0.2) / 4
    torch.testing.assert_close(model[2].weight, torch.tensor([[mu, 7.0, 3.0, -4.0], [mu, mu, mu, 6.0]]))
    assert costs == {"2": StorageCost(kept=4, constants=1, mask_bits=8, sign_bits=0)}


def test_nothing_pruned_changes_nothing():
    assert torch.equal(recovered(BEFORE, torch.ones_like(MASK), "filter_mean"), BEFORE)


def test_refusals_name_the_field():
    model = nn.Sequential(HSConv2d(1, 2, 1))
    mask = {"0": torch.ones(2, 1, 1, 1, dtype=torch.bool)}
    with pytest.raises(UserError, match="^recovery: '0' is hyperspherical; bake the model first"):
        recover(model, mask, {"0": model[0].weight.detach()})
    with pytest.raises(UserError, match="^masks: '0' is not a layer of the model with its values"):
        recover(model, mask, {})
    with pytest.raises(UserError, match="^recovery: expected one of layer_mean, filter_mean, signed_abs_mean"):
        recovered(BEFORE, MASK, "mean")
    with pytest.raises(UserError, match="^masks: expected a mask shaped"):
        recovered(BEFORE, MASK.T, "layer_mean")
