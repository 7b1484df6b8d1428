"""The pruned-energy penalty: hand-computed values and gradients, ramps, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.core.energy import PrunedEnergyPenalty, low_magnitude_mask, pruned_count
from prunekit.core.hyperspherical import HSConv2d
from prunekit.core.schedules import build_schedule
from prunekit.core.selection import top_k_mask
from prunekit.errors import UserError

D = torch.float64


def hand_conv() -> HSConv2d:
    """Two filters of three entries: ŵ_0 = [1, 2, 2]/3, ŵ_1 = [0, 3, 4]/5."""
    conv = HSConv2d(1, 2, (1, 3), dtype=D)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], dtype=D).view(2, 1, 1, 3))
    return conv


def hand_linear() -> nn.Linear:
    """Rows [2, -1, 2] (norm 3) and [0, 0, 5] (norm 5)."""
    layer = nn.Linear(3, 2, bias=False, dtype=D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0, 2.0], [0.0, 0.0, 5.0]], dtype=D))
    return layer


def test_one_layer_value_and_gradient():
    # s = 0.5, n = 6: P = the 3 smallest |ŵ| = {0 (f1), 1/3 (f0), 3/5 (f1)}.
    # E_0 = 1/9, E_1 = 9/25; R = (1/9 + 9/25)/2 = 53/225; penalty = λ R = 106/225.
    # ∂E_f/∂w_f = (2/‖w_f‖)(P_f ⊙ ŵ_f − E_f ŵ_f); ∂penalty/∂w_f = λ/F · that (λ/F = 1).
    conv = hand_conv()
    term = PrunedEnergyPenalty({"conv": conv}, lam=2.0, sparsity=0.5)
    penalty, energies = term(1.0)
    torch.testing.assert_close(penalty, torch.tensor(106 / 225, dtype=D))
    assert not energies.requires_grad and term.by_layer(energies) == {"conv": pytest.approx(53 / 225, abs=1e-15)}
    penalty.backward()
    expected = torch.tensor([[16 / 81, -4 / 81, -4 / 81], [0.0, 96 / 625, -72 / 625]], dtype=D)
    torch.testing.assert_close(conv.weight.grad.view(2, 3), expected)


def test_mean_over_layers_with_a_row_normalised_linear():
    # Linear: ŵ rows [2, -1, 2]/3 and [0, 0, 1]; P = {-1/3, 0, 0}: E = [1/9, 0], R = 1/18.
    # penalty = (53/225 + 1/18)/2 = 131/900; factor λ/(L·F) = 1/4 on every per-filter gradient.
    conv, linear = hand_conv(), hand_linear()
    term = PrunedEnergyPenalty({"conv": conv, "fc": linear}, lam=1.0, sparsity=0.5)
    penalty, energies = term(0.3)
    torch.testing.assert_close(penalty, torch.tensor(131 / 900, dtype=D))
    assert term.by_layer(energies) == pytest.approx({"conv": 53 / 225, "fc": 1 / 18}, abs=1e-15)
    penalty.backward()
    torch.testing.assert_close(conv.weight.grad.view(2, 3),
                               torch.tensor([[4 / 81, -1 / 81, -1 / 81], [0.0, 24 / 625, -18 / 625]], dtype=D))
    torch.testing.assert_close(linear.weight.grad,
                               torch.tensor([[-1 / 81, -4 / 81, -1 / 81], [0.0, 0.0, 0.0]], dtype=D))


def test_mask_is_recomputed_at_every_call():
    conv = hand_conv()
    penalty = PrunedEnergyPenalty({"conv": conv}, lam=1.0, sparsity=0.5)
    with torch.no_grad():
        conv.weight[1, 0, 0] = torch.tensor([5.0, 3.0, 4.0], dtype=D)  # now ŵ_1 = [5, 3, 4]/√50
    # smallest three |ŵ|: 1/3 (f0), 3/√50 ≈ 0.42 and 4/√50 ≈ 0.57 (f1): E = [1/9, 25/50]
    _, energies = penalty(1.0)
    assert energies.item() == pytest.approx((1 / 9 + 1 / 2) / 2)


def test_ties_go_to_the_higher_index_like_the_pruning_masks():
    values = torch.ones(2, 3)
    assert low_magnitude_mask(values, 2).tolist() == [[False, False, False], [False, True, True]]
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    _, energies = PrunedEnergyPenalty({"fc": layer}, sparsity=0.5)(0.0)
    assert energies.item() == pytest.approx(0.5)  # two entries of ŵ = -1/2


@pytest.mark.parametrize("pruned", [0, 1, 7, 20, 24])
def test_low_magnitude_mask_is_the_complement_of_top_k(pruned):
    values = torch.randint(-3, 4, (4, 6)).float()  # many ties
    assert torch.equal(low_magnitude_mask(values, pruned), ~top_k_mask(values.abs(), 24 - pruned))


def test_pruned_count_is_the_floor_with_a_float_guard():
    assert pruned_count(2304, 0.7) == 1612 and pruned_count(10, 0.7) == 7
    assert pruned_count(100, 0.57) == 57  # 0.57 · 100 = 56.99999999999999
    assert pruned_count(9, 0.0) == 0


def test_lambda_ramp_and_sparsity_schedule():
    conv = hand_conv()
    penalty = PrunedEnergyPenalty({"conv": conv}, lam=2.0, sparsity=build_schedule("linear", 0.5, end=0.5),
                                  lam_ramp=0.1)
    assert penalty.lam_at(0.0) == 0.0 and penalty.lam_at(0.05) == pytest.approx(1.0) and penalty.lam_at(0.5) == 2.0
    value, energies = penalty(0.25)  # s = 0.25: ⌊1.5⌋ = 1 entry, the 0 of filter 1
    assert penalty.sparsity_at(0.25) == 0.25 and value.item() == 0.0 and energies.item() == 0.0
    value, _ = penalty(0.05)  # s = 0.05: no entry; λ = 1
    assert value.item() == 0.0
    value, _ = penalty(1.0)
    assert value.item() == pytest.approx(106 / 225)


def test_the_ramped_lambda_is_the_one_that_scales_the_penalty():
    penalty = PrunedEnergyPenalty({"conv": hand_conv()}, lam=2.0, sparsity=0.5, lam_ramp=0.1)
    assert penalty(1.0)[0].item() == pytest.approx(106 / 225)  # λ = 2 on the same 3 entries as above
    assert penalty(0.05)[0].item() == pytest.approx(53 / 225)  # half-way up the ramp: λ = 1
    assert penalty(0.0)[0].item() == 0.0 and penalty(0.0)[1].item() > 0  # λ = 0, the energy is not


@pytest.mark.parametrize("kwargs, field", [
    ({"lam": -1.0}, "lam"), ({"lam": float("nan")}, "lam"), ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"), ({"sparsity": 70}, "sparsity"), ({"lam_ramp": 1.5}, "lam_ramp"),
    ({"sparsity": build_schedule("linear", 1.0)}, "sparsity")])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(UserError, match=rf"^{field}:"):
        PrunedEnergyPenalty({"conv": hand_conv()}, **kwargs)


def test_plain_convs_are_refused():
    with pytest.raises(UserError, match=r"^layers: '0' is a Conv2d; the penalty needs hyperspherical convs"):
        PrunedEnergyPenalty({"0": nn.Conv2d(1, 1, 1)})
    with pytest.raises(UserError, match="^layers: no layer"):
        PrunedEnergyPenalty({})
