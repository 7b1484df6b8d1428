import copy

import pytest
import torch

from prunekit.core.compaction import compact_masked
from prunekit.core.layers import filter_prunable_layers
from prunekit.core.prune_once import prune_once
from prunekit.core.sparsifier import Sparsifier
from prunekit.measure import count_macs
from prunekit.models import build_model

X = torch.zeros(1, 3, 32, 32)


def test_option_a_resnet_prunes_only_block_internal_channels():
    model = build_model("resnet20")
    layers = filter_prunable_layers(model, X)
    assert layers == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


@pytest.mark.parametrize("scope, round_to", [("local", None), ("local", 8), ("global", None), ("global", 8)])
def test_macs_target_is_met_from_below_and_checked_after_compaction(scope, round_to):
    torch.manual_seed(0)
    model = build_model("resnet20")
    dense = count_macs(model, (3, 32, 32)).total
    sparsifier = prune_once(model, X, target="macs=0.3", scope=scope, round_to=round_to)
    result = compact_masked(model, sparsifier.mask_set, X)
    after = count_macs(model, (3, 32, 32)).total
    assert after <= 0.7 * dense
    assert result.max_abs_diff < 1e-4
    widths = {stage: {model.get_submodule(f"layer{stage}.{b}.conv1").out_channels for b in range(3)}
              for stage in (1, 2, 3)}
    if scope == "local":  # the same share of every layer: one width per stage
        assert all(len(w) == 1 for w in widths.values()), widths
    if round_to:
        assert all(w % 8 == 0 for stage in widths.values() for w in stage)


def test_plan_changes_nothing_and_update_applies_the_plan():
    torch.manual_seed(0)
    model = build_model("resnet20")
    before = copy.deepcopy(model.state_dict())
    sparsifier = Sparsifier(model, "filter", "l1", "local", filter_prunable_layers(model, X))
    planned = sparsifier.plan(0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    sparsifier.update(0.5)
    assert {n: torch.equal(m, planned[n]) for n, m in sparsifier.unit_masks().items()} == dict.fromkeys(planned, True)
