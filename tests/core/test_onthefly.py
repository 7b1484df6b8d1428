"""Pruning a trained model at any ratio: exact counts, exemptions, ranking, scopes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.core.hyperspherical import HSConv2d, effective_weight
from prunekit.core.onthefly import prunable_layers, prune_at_ratio, ratio_masks
from prunekit.core.selection import keep_count
from prunekit.core.sparsifier import Sparsifier
from prunekit.core.transforms import apply_transform
from prunekit.errors import UserError
from prunekit.models import build_model


def baked(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = apply_transform(build_model(name, in_channels=3), "hyperspherical")
    return apply_transform(model, "bake_hyperspherical")


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.8])
def test_exactly_round_s_n_zeros_per_prunable_layer_none_in_the_first_conv(name, s):
    model = baked(name)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    masks = prune_at_ratio(model, s)
    modules = dict(model.named_modules())
    first = next(n for n, m in modules.items() if isinstance(m, nn.Conv2d))
    classifier = next(n for n, m in reversed(modules.items()) if isinstance(m, nn.Linear))
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert set(masks) == {*convs[1:], classifier} and first not in masks
    assert torch.equal(modules[first].weight, before[first])
    for layer, mask in masks.items():
        weight, n = modules[layer].weight, mask.numel()
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((weight == 0).sum()) == int((~mask).sum()) == round(s * n) == n - keep_count(n, s)
        assert torch.equal(weight[mask], before[layer][mask])  # kept entries untouched
        if layer != classifier:  # plain (baked) conv: ranked by |ŵ| as stored
            assert before[layer][mask].abs().min() >= before[layer][~mask].abs().max()


def test_classifier_switch_and_layer_patterns():
    model = baked("small_cnn")
    assert set(prunable_layers(model, prune_classifier=False)) == {"features.1.0", "features.2.0"}
    masks = prune_at_ratio(model, 0.5, prune_classifier=False, layers=["*", "!features.2.*"])
    assert set(masks) == {"features.1.0"} and not (model.fc.weight == 0).any()
    with pytest.raises(UserError, match="^layers: no prunable"):
        prunable_layers(nn.Sequential(nn.Conv2d(1, 1, 1)), prune_classifier=False)
    with pytest.raises(UserError, match="^prune_classifier"):
        prunable_layers(model, prune_classifier="yes")


def test_classifier_is_ranked_row_normalised_unless_raw():
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[10.0, 9.0], [1.0, 0.5]]))  # rows normalised: [.74, .67], [.89, .45]
    assert ratio_masks(model, 0.5)["2"].tolist() == [[True, False], [True, False]]
    assert ratio_masks(model, 0.5, scores="raw")["2"].tolist() == [[True, True], [False, False]]
    assert model[2].weight[1, 1] == 0.5  # ratio_masks changes nothing


def test_an_unbaked_hyperspherical_model_is_ranked_by_unit_weight():
    torch.manual_seed(0)
    model = apply_transform(build_model("small_cnn", in_channels=3), "hyperspherical")
    conv = model.features[1][0]
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 10, conv.out_channels).view(-1, 1, 1, 1))  # raw norms differ
    unit = effective_weight(conv).detach().clone()
    masks = prune_at_ratio(model, 0.7)
    assert isinstance(conv, HSConv2d)
    assert unit[masks["features.1.0"]].abs().min() >= unit[~masks["features.1.0"]].abs().max()
    assert int((conv.weight == 0).sum()) == round(0.7 * conv.weight.numel())


def test_global_scope_counts_over_all_prunable_entries():
    model = baked("resnet20")
    masks = prune_at_ratio(copy.deepcopy(model), 0.6, scope="global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == total - keep_count(total, 0.6)
    assert len({int((~m).sum()) / m.numel() for m in masks.values()}) > 1  # not uniform per layer


@pytest.mark.parametrize("kwargs, field", [({"sparsity": 1.5}, "sparsity"), ({"sparsity": "0.5"}, "sparsity"),
                                           ({"sparsity": 0.5, "scope": "all"}, "scope"),
                                           ({"sparsity": 0.5, "scores": "l2"}, "scores")])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(UserError, match=rf"^{field}:"):
        ratio_masks(baked("small_cnn"), **kwargs)


def test_masks_feed_the_existing_mask_enforcement_for_fine_tuning():
    """§1.3.7: the pruned HS model fine-tuned under fixed masks keeps its pruned entries at zero."""
    torch.manual_seed(0)
    model = apply_transform(build_model("small_cnn", in_channels=3), "hyperspherical")
    masks = prune_at_ratio(model, 0.7)
    sparsifier = Sparsifier(model, "weight", layers=sorted(masks), include_first_conv=True, include_classifier=True)
    sparsifier.load_state_dict({"masks": masks, "generator": sparsifier.generator.get_state()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        sparsifier.enforce(optimizer)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert not modules[name].weight[~mask].any() and modules[name].weight[mask].all()
