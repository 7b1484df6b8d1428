"""NPTM's one-shot pruning (METHODS §2.3): L1 filter configurations, random variants, global magnitude."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import UserError
from prunekit.measure import count_params
from prunekit.methods.filter_config import (FILTER_CONFIGS, ResNetConfig, conv_ids, filter_keep, global_magnitude,
                                             kept_counts, prune_filters)
from prunekit.models import build_model

ARCH = {"resnet20": "resnet20", "resnet56": "resnet56", "resnet110": "resnet110", "vgg16": "vgg16_bn"}
# Parameters removed, as published by Li et al. 2017 (the [FIG] values of METHODS §2.3.1 where given).
PUBLISHED = {"resnet56-A": 0.094, "resnet56-B": 0.137, "resnet110-A": 0.023, "resnet110-B": 0.324, "vgg16-A": 0.640}


def model_for(config: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH[config.split("-")[0]])


def removed_fraction(config: str, criterion: str = "l1") -> float:
    model = model_for(config)
    dense = count_params(model)
    result = prune_filters(model, config, criterion)
    assert result.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # the compacted model still runs
    return 1 - count_params(result.model) / dense


@pytest.mark.parametrize("config", ["resnet56-B", "vgg16-A"])
def test_headline_configurations_remove_the_published_share_of_parameters(config):
    target = {"resnet56-B": 0.14, "vgg16-A": 0.64}[config]
    assert removed_fraction(config) == pytest.approx(target, abs=0.02)
    assert removed_fraction(config, "random") == pytest.approx(removed_fraction(config), abs=1e-12)


@pytest.mark.parametrize("family", [["resnet56-A", "resnet56-B", "resnet56-C", "resnet56-D"],
                                    ["resnet110-A", "resnet110-B", "resnet110-C", "resnet110-D"],
                                    ["vgg16-A", "vgg16-B", "vgg16-C"]])
def test_every_configuration_compacts_and_harder_variants_remove_more(family):
    fractions = [removed_fraction(config) for config in family]
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    for config, fraction in zip(family, fractions):
        if config in PUBLISHED:
            assert fraction == pytest.approx(PUBLISHED[config], abs=0.01), config


def test_conv_numbering_matches_methods():
    ids = conv_ids(build_model("resnet56"))
    assert ids["conv1"] == 1 and ids["layer1.0.conv1"] == 2 and ids["layer1.0.conv2"] == 3
    assert ids["layer3.8.conv2"] == 55 and len(ids) == 55
    # stage by id: ≤ 18 → 0, ≤ 36 → 1, else 2 (block-first convs are the even ids)
    for name, i in ids.items():
        if name.endswith(".conv1") and name != "conv1":
            assert i % 2 == 0
            assert int(name[5]) - 1 == (0 if i <= 18 else 1 if i <= 36 else 2), name
    ids110 = conv_ids(build_model("resnet110"))
    assert ids110["layer1.17.conv1"] == 36 and ids110["layer2.0.conv1"] == 38 and ids110["layer3.0.conv1"] == 74
    # option-B shortcut convs are not numbered, so ids keep their meaning
    assert conv_ids(build_model("resnet56_b")) == ids


@pytest.mark.parametrize("config", [n for n in FILTER_CONFIGS.names() if not n.startswith("vgg")])
def test_skip_ids_keep_all_filters_and_counts_truncate(config):
    model = model_for(config)
    spec = FILTER_CONFIGS.get(config)
    ids = conv_ids(model)
    counts = kept_counts(model, config)
    keep = filter_keep(model, config)
    assert keep.keys() == counts.keys()
    for name, i in ids.items():
        block_first = name.endswith(".conv1") and name != "conv1"
        stage = int(name[5]) - 1 if block_first else None
        if not block_first or i in spec.skip or spec.ratios[stage] == 0:
            assert name not in counts, name  # stem, conv2 (residual width), skipped ids: untouched
            continue
        channels = dict(model.named_modules())[name].out_channels
        assert counts[name] == (int(channels * (1 - spec.ratios[stage])), channels)
        assert keep[name].dtype == torch.long and len(keep[name]) == counts[name][0]


def test_truncation_not_rounding():
    counts = kept_counts(build_model("resnet56"), "resnet56-B")
    assert counts["layer1.0.conv1"] == (6, 16)  # 16·0.4 = 6.4
    assert counts["layer2.1.conv1"] == (22, 32)  # 32·0.7 = 22.4
    assert counts["layer3.1.conv1"] == (57, 64)  # 64·0.9 = 57.6: rounding would keep 58
    assert kept_counts(build_model("resnet110"), "resnet110-D")["layer3.1.conv1"] == (19, 64)  # 64·0.3 = 19.2


def test_resnet20_proposed_mapping():
    spec = FILTER_CONFIGS.get("resnet20-B")
    assert spec.skip == {8, 14, 18} and spec.ratios == (0.6, 0.3, 0.1)
    counts = kept_counts(build_model("resnet20"), "resnet20-B")
    assert counts == {"layer1.0.conv1": (6, 16), "layer1.1.conv1": (6, 16), "layer1.2.conv1": (6, 16),
                      "layer2.1.conv1": (22, 32), "layer2.2.conv1": (22, 32), "layer3.1.conv1": (57, 64)}


def test_vgg_targets():
    model = build_model("vgg16_bn")
    counts = kept_counts(model, "vgg16-A")
    assert counts == {"features.conv0": (32, 64), **{f"features.conv{i}": (256, 512) for i in (10, 11, 12, 14, 15, 16)}}
    assert kept_counts(model, "vgg16-C")["features.conv3"] == (64, 128)


def test_l1_keeps_the_largest_filters_and_random_keeps_the_same_counts():
    model = build_model("resnet56")
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight.copy_(torch.arange(16, dtype=torch.float).flip(0).view(16, 1, 1, 1).expand_as(conv.weight))
        conv.weight[[3, 9]] *= 100  # two big filters that are not the first ones
    keep = filter_keep(model, "resnet56-B")
    assert keep["layer1.0.conv1"].tolist() == [0, 1, 2, 3, 4, 9]
    random_a = filter_keep(model, "resnet56-B", "random", seed=1)
    random_b = filter_keep(model, "resnet56-B", "random", seed=1)
    other = filter_keep(model, "resnet56-B", "random", seed=2)
    assert {n: len(k) for n, k in random_a.items()} == {n: len(k) for n, k in keep.items()}
    assert all(torch.equal(random_a[n], random_b[n]) for n in keep)  # seeded
    assert any(not torch.equal(random_a[n], other[n]) for n in keep)
    assert any(not torch.equal(random_a[n], keep[n]) for n in keep)
    assert all(torch.equal(k, k.sort().values) and k.unique().numel() == k.numel() for k in random_a.values())


def test_configurations_refuse_other_models():
    with pytest.raises(UserError, match="config: made for ResNet-56 with 3 stages, the model is ResNet-20"):
        filter_keep(build_model("resnet20"), "resnet56-B")
    with pytest.raises(UserError, match="model: a VGG configuration needs the CIFAR VGG"):
        filter_keep(build_model("resnet20"), "vgg16-A")
    with pytest.raises(UserError, match="unknown filter-pruning configuration 'resnet56-E'"):
        filter_keep(build_model("resnet56"), "resnet56-E")
    custom = ResNetConfig(20, frozenset(), (0.5, 0.5, 0.5))
    assert len(filter_keep(build_model("resnet20"), custom)) == 9


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_global_magnitude_over_conv_weights_only(criterion):
    torch.manual_seed(0)
    model = build_model("resnet20")
    fc = model.fc.weight.detach().clone()
    sparsifier = global_magnitude(model, 0.8, criterion, seed=3)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(sparsifier.layers) == set(convs)  # every conv, the first included; no Linear
    assert torch.equal(model.fc.weight, fc)
    total = sum(m.weight.numel() for m in convs.values())
    zeros = sum(int((m.weight == 0).sum()) for m in convs.values())
    assert zeros == total - round(0.2 * total)
    per_layer = sparsifier.realised_sparsity().per_layer
    if criterion == "l1":  # one global ranking: layer-wise sparsities differ (threshold: next test)
        assert max(per_layer.values()) - min(per_layer.values()) > 0.1
    else:  # random: about the same sparsity in every layer
        assert all(abs(s - 0.8) < 0.1 for s in per_layer.values())
    with pytest.raises(UserError, match="criterion: expected l1 or random"):
        global_magnitude(build_model("resnet20"), 0.5, "taylor")


def test_global_magnitude_uses_one_threshold():
    torch.manual_seed(1)
    model = build_model("resnet20")
    before = {n: m.weight.detach().abs().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    sparsifier = global_magnitude(model, 0.5)
    kept = torch.cat([before[n][m > 0] for n, m in sparsifier.masks().items()])
    pruned = torch.cat([before[n][m == 0] for n, m in sparsifier.masks().items()])
    assert kept.min() >= pruned.max()
