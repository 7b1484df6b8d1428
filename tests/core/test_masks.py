"""Mask selection: oracles against torch.nn.utils.prune, N:M validity, exact top-k, targets."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from prunekit.core.granularity import NM, get_granularity
from prunekit.core.selection import keep_count, round_kept, top_k_indices, top_k_mask
from prunekit.core.sparsifier import Sparsifier
from prunekit.core.targets import Target, bisect_macs, parse_target, table_macs
from prunekit.errors import UserError
from prunekit.measure.macs import count_macs


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def layers_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def no_ties(model: nn.Module) -> None:
    values = torch.cat([m.weight.detach().abs().flatten() for m in layers_of(model)])
    assert values.unique().numel() == values.numel()


def torch_agrees(n: int, s: float) -> bool:
    """torch prunes round(s·n); prunekit keeps round((1 − s)·n)."""
    return round(s * n) == n - keep_count(n, s)


# ------------------------------------------------------------------ oracles
@pytest.mark.parametrize("s", [0.0, 0.3, 0.7, 0.9, 1.0])
def test_local_l1_unstructured_matches_torch(s):
    model = tiny_net()
    no_ties(model)
    oracle = copy.deepcopy(model)
    Sparsifier(model, "weight", "l1", "local", include_classifier=True).update(s)
    for ours, theirs in zip(layers_of(model), layers_of(oracle)):
        assert torch_agrees(ours.weight.numel(), s)
        prune.l1_unstructured(theirs, "weight", amount=s)
        assert torch.equal(ours.weight_mask, theirs.weight_mask)
        assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_global_unstructured_matches_torch(s):
    model = tiny_net()
    no_ties(model)
    oracle = copy.deepcopy(model)
    Sparsifier(model, "weight", "l1", "global", include_classifier=True).update(s)
    total = sum(m.weight.numel() for m in layers_of(model))
    assert torch_agrees(total, s)
    prune.global_unstructured([(m, "weight") for m in layers_of(oracle)], pruning_method=prune.L1Unstructured,
                              amount=s)
    for ours, theirs in zip(layers_of(model), layers_of(oracle)):
        assert torch.equal(ours.weight_mask, theirs.weight_mask)


@pytest.mark.parametrize("s", [0.25, 0.4, 0.75])
def test_l2_filter_matches_torch_ln_structured(s):
    model = tiny_net()
    oracle = copy.deepcopy(model)
    Sparsifier(model, "filter", "l2", "local", include_classifier=True).update(s)
    for ours, theirs in zip(layers_of(model), layers_of(oracle)):
        assert torch_agrees(ours.weight.shape[0], s)
        prune.ln_structured(theirs, "weight", amount=s, n=2, dim=0)
        assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_documented_rounding_difference_from_torch():
    """n = 5, s = 0.5: torch prunes round(2.5) = 2 (banker's rounding); prunekit keeps round(2.5) = 2."""
    layer = nn.Linear(5, 1)
    oracle = copy.deepcopy(layer)
    Sparsifier(layer, "weight", "l1", include_classifier=True).update(0.5)
    prune.l1_unstructured(oracle, "weight", amount=0.5)
    assert int(layer.weight_mask.sum()) == 2
    assert int(oracle.weight_mask.sum()) == 3


# --------------------------------------------------------------------- N:M
def _nm_groups(weight: torch.Tensor, m: int):
    """Yield the groups of M consecutive input-dim weights, one (o, position) at a time (independent of
    the implementation's reshapes)."""
    out, ins = weight.shape[:2]
    for o in range(out):
        for pos in itertools.product(*[range(k) for k in weight.shape[2:]]):
            for start in range(0, ins, m):
                yield weight[(o, slice(start, start + m), *pos)]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (3, 16, 1, 1), (2, 8, 2, 3), (5, 16), (3, 24)])
def test_nm_pattern(shape, n, m):
    torch.manual_seed(1)
    layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    original = layer.weight.detach().clone()
    Sparsifier(layer, f"nm:{n}:{m}", "l1", include_classifier=True).update()
    masked = layer.weight.detach()
    for kept, dense in zip(_nm_groups(masked, m), _nm_groups(original, m)):
        assert int((kept != 0).sum()) == n
        assert dense.abs()[kept != 0].min() > dense.abs()[kept == 0].max()


def test_nm_rejects_input_not_divisible_and_wrong_sparsity():
    with pytest.raises(UserError, match="not a multiple of M=4"):
        Sparsifier(nn.Conv2d(3, 8, 3), "nm:2:4")
    sparsifier = Sparsifier(nn.Conv2d(8, 8, 3), "2:4")
    sparsifier.update("weights=0.5")
    with pytest.raises(UserError, match="fixes the sparsity at 0.5"):
        sparsifier.update(0.9)


def test_granularity_names():
    assert get_granularity("nm:2:4").name == "nm:2:4" and get_granularity("1:2").n == 1
    with pytest.raises(UserError, match="unknown granularity 'row'"):
        get_granularity("row")
    with pytest.raises(UserError, match="0 < N <= M"):
        NM(5, 4)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["weight", "kernel", "filter", "channel"])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.35, 0.5, 0.8])
def test_realised_fraction_is_exact_per_scope(granularity, s):
    for scope in ("local", "global"):
        model = tiny_net()
        sparsifier = Sparsifier(model, granularity, "l1", scope, include_classifier=True, allow_empty=True)
        sparsifier.update(s)
        kept = {name: int(units.sum()) for name, units in sparsifier.unit_masks().items()}
        sizes = {name: units.numel() for name, units in sparsifier.unit_masks().items()}
        if scope == "local":
            assert kept == {name: keep_count(n, s) for name, n in sizes.items()}
        else:
            assert sum(kept.values()) == keep_count(sum(sizes.values()), s)


def test_ties_broken_by_index():
    model = tiny_net()
    for m in layers_of(model):
        nn.init.constant_(m.weight, 0.5)
    Sparsifier(model, "weight", "l1", "local", include_classifier=True).update(0.5)
    for m in layers_of(model):
        n, k = m.weight.numel(), keep_count(m.weight.numel(), 0.5)
        assert torch.equal(m.weight_mask.flatten(), (torch.arange(n) < k).float())

    model = tiny_net()
    for m in layers_of(model):
        nn.init.constant_(m.weight, 0.5)
    Sparsifier(model, "weight", "l1", "global", include_classifier=True).update(0.5)
    flat = torch.cat([m.weight_mask.flatten() for m in layers_of(model)])
    assert torch.equal(flat, (torch.arange(flat.numel()) < keep_count(flat.numel(), 0.5)).float())

    conv = nn.Conv2d(2, 6, 1)
    nn.init.constant_(conv.weight, 1.0)
    Sparsifier(conv, "filter").update(0.5)
    assert conv.weight_mask[:, 0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_top_k_mask_is_the_stable_sort_choice_with_ties_infinities_nans_and_signed_zeros(dtype):
    """The linear-time mask keeps exactly the units a stable descending sort ranks first."""
    g = torch.Generator().manual_seed(0)
    specials = [0.0, -0.0] + ([float("inf"), float("-inf"), float("nan")] if dtype.is_floating_point else [])
    for trial in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        values = torch.randint(-3, 4, (n,), generator=g).double()
        if trial % 2:
            values[torch.rand(n, generator=g) < 0.4] = specials[trial % len(specials)]
        scores = values.to(dtype)
        for k in range(n + 1):
            order = torch.sort(-scores, stable=True).indices[:k]
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order] = True
            assert torch.equal(top_k_mask(scores, k), expected), (scores, k)
            assert torch.equal(top_k_indices(scores, k), order.sort().values)


def test_sparsity_zero_and_one():
    model = tiny_net()
    sparsifier = Sparsifier(model, "weight", include_classifier=True)
    sparsifier.update(0.0)
    assert sparsifier.realised_sparsity().total == 0
    sparsifier.update(1.0)
    assert sparsifier.realised_sparsity().total == 1
    assert all(int((m.weight != 0).sum()) == 0 for m in layers_of(model))


def test_emptying_a_filter_layer_is_refused_unless_allowed():
    with pytest.raises(UserError, match="would lose all its filters"):
        Sparsifier(tiny_net(), "filter").update(1.0)
    sparsifier = Sparsifier(tiny_net(), "filter", allow_empty=True)
    sparsifier.update("filters=1")
    assert sparsifier.realised_sparsity().total == 1


def test_round_to():
    assert [round_kept(k, 20, 8) for k in (0, 1, 4, 11, 12, 13, 19, 20)] == [0, 8, 8, 8, 16, 16, 16, 20]
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 48, 1))
    sparsifier = Sparsifier(model, "filter", round_to=8)
    sparsifier.update(0.3)  # 22.4 -> 22 -> 24; 33.6 -> 34 -> 32
    assert [int(u.sum()) for u in sparsifier.unit_masks().values()] == [24, 32]
    with pytest.raises(UserError, match="round_to"):
        Sparsifier(model, "filter", round_to=0)


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize("spec,expected", [
    ("weights=0.9", Target("weights", 0.9)),
    (" filters = 0.5 ", Target("filters", 0.5)),
    ("MACS=0", Target("macs", 0.0)),
    ("macs=1", Target("macs", 1.0)),
    ("weights=1e-1", Target("weights", 0.1)),
])
def test_parse_target_accepts(spec, expected):
    assert parse_target(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("0.9", "target needs a unit: weights=…, filters=… or macs=…"),
    (0.9, "target needs a unit"),
    ("", "target needs a unit"),
    ("weights=90", "write weights=0.9 for 90%"),
    ("weights=90%", "e.g. weights=0.9 for 90%"),
    ("filters=1.5", "expects a fraction removed in [0, 1], got 1.5"),
    ("macs=-0.1", "expects a fraction removed in [0, 1], got -0.1"),
    ("weights=nan", "in [0, 1]"),
    ("params=0.5", "unknown unit 'params'"),
    ("weights=lots", "expected a number (ASCII digits) after 'weights='"),
    ("weights=٠.٥", "expected a number (ASCII digits) after 'weights='"),  # Arabic-Indic 0.5: float() reads it
])
def test_parse_target_rejects(spec, message):
    with pytest.raises(UserError) as err:
        parse_target(spec)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_target_must_fit_the_granularity():
    with pytest.raises(UserError, match="it prunes filters, use filters="):
        Sparsifier(tiny_net(), "filter").update("weights=0.5")
    with pytest.raises(UserError, match="macs_of"):
        Sparsifier(tiny_net(), "filter").update("macs=0.5")
    with pytest.raises(UserError, match="needs a target"):
        Sparsifier(tiny_net()).update()


# ---------------------------------------------------------- MACs bisection
CHAIN = (3, 16, 24, 32)  # input channels, then the filters of the three convs
SIDE = 8


def chain_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for cin, cout in zip(CHAIN, CHAIN[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHAIN[-1], 10))


def chain_macs(keep) -> int:
    """thop-convention MACs of chain_cnn compacted to the kept filters (convs are '0', '3', '6')."""
    kept = [CHAIN[0], *(int(keep[name].sum()) for name in ("0", "3", "6"))]
    area = SIDE * SIDE
    convs = sum(area * cout * cin * 9 + 2 * area * cout for cin, cout in zip(kept, kept[1:]))
    return convs + (area + 1) * kept[-1] + kept[-1] * 10


def test_chain_counter_agrees_with_count_macs_and_compaction():
    model, x = chain_cnn(), torch.randn(1, 3, SIDE, SIDE)
    dense = {name: torch.ones(c, dtype=torch.bool) for name, c in zip(("0", "3", "6"), CHAIN[1:])}
    assert chain_macs(dense) == count_macs(model, x).total
    keep = {name: torch.rand(c, generator=torch.Generator().manual_seed(3)) > 0.4 for name, c in
            zip(("0", "3", "6"), CHAIN[1:])}
    assert chain_macs(keep) == table_macs(model, x)(keep)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_macs_target_within_one_filter(fraction):
    model = chain_cnn()
    sparsifier = Sparsifier(model, "filter", "l1", "global", include_first_conv=True, normalize=True,
                            macs_of=chain_macs)
    sparsifier.update(f"macs={fraction}")
    keep = sparsifier.unit_masks()
    budget = (1 - fraction) * chain_macs({n: torch.ones_like(k) for n, k in keep.items()})
    achieved = chain_macs(keep)
    assert achieved <= budget

    def plus_one(name):
        grown = {n: k.clone() for n, k in keep.items()}
        grown[name][(~grown[name]).nonzero()[0]] = True
        return chain_macs(grown) - achieved

    assert budget - achieved < max(plus_one(name) for name in keep if not keep[name].all())
    assert all(k.any() for k in keep.values())


def test_macs_bisection_adds_filters_in_rank_order():
    scores = {"0": torch.tensor([3.0, 1.0, 2.0]), "3": torch.tensor([0.5, 4.0])}
    keep = bisect_macs(scores, 0.4, lambda k: sum(int(m.sum()) for m in k.values()) * 10)  # budget 30
    assert keep["0"].tolist() == [True, False, True] and keep["3"].tolist() == [False, True]


def test_macs_target_out_of_reach():
    sparsifier = Sparsifier(chain_cnn(), "filter", macs_of=chain_macs)
    with pytest.raises(UserError, match="out of reach"):
        sparsifier.update("macs=0.999")
