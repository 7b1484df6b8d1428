"""AutoBot's losses, gate selection and global-threshold bisection (METHODS §4.4-4.6)."""

from __future__ import annotations

import copy

import pytest
import torch

from gate_helpers import X, random_gates, trained_like
from prunekit.core.gate_losses import bool_loss, flops_loss
from prunekit.core.gate_selection import BestGates
from prunekit.core.gate_threshold import masks_at, threshold_gates
from prunekit.core.gates import gate_values, insert_gates, remove_gates
from prunekit.core.scatter import prune_channels, pruned_macs
from prunekit.errors import UserError
from prunekit.measure.macs import count_macs


def test_flops_loss_is_zero_at_the_target_and_one_at_zero_and_dense():
    T, dense = 40.0, 100.0
    assert [flops_loss(f, T, dense).item() for f in (40.0, 0.0, 100.0, 70.0, 20.0, 130.0)] == \
        pytest.approx([0.0, 1.0, 1.0, 0.5, 0.5, 1.5])
    for f, slope in ((70.0, 1 / 60), (20.0, -1 / 40)):
        macs = torch.tensor(f, requires_grad=True)
        flops_loss(macs, T, dense).backward()
        assert macs.grad.item() == pytest.approx(slope)
    assert flops_loss(126_554_816, 56_000_000, 126_554_816).item() == 1.0
    for target in (0, 100, 120):
        with pytest.raises(UserError, match="target: expected MACs strictly between 0 and the dense 100"):
            flops_loss(50.0, target, dense)


def test_bool_loss_averages_per_layer_then_over_layers():
    first = torch.tensor([0.1, 0.9, 0.5, 1.0], requires_grad=True)
    second = torch.tensor([0.3, 0.7], requires_grad=True)
    loss = bool_loss([first, second])
    assert loss.item() == pytest.approx((0.7 / 4 + 0.6 / 2) / 2)  # per channel over all would be 1.3 / 6
    loss.backward()
    assert first.grad.tolist() == pytest.approx([1 / 8, -1 / 8, 1 / 8, 0.0])
    assert second.grad.tolist() == pytest.approx([1 / 4, -1 / 4])
    assert bool_loss([torch.tensor([0.0, 1.0])]).item() == 0.0
    with pytest.raises(ValueError):
        bool_loss([])


def test_best_gates_keep_the_lowest_loss_step_after_60_percent():
    losses = [0.1, 5, 4, 3, 2, 1, 0.01, 0.95, 0.5, 0.7]  # step 0 and step 6 (= 0.6 n) are too early
    best = BestGates()
    kept = [best.update(i, len(losses), torch.tensor(loss), {"a": torch.full((3,), float(i))})
            for i, loss in enumerate(losses)]
    assert kept == [False] * 7 + [True, True, False]
    assert best.step == 8 and best.loss == 0.5 and best.gates["a"].tolist() == [8.0] * 3
    again = BestGates()
    again.load_state_dict(best.state_dict())
    assert again.step == 8 and torch.equal(again.gates["a"], best.gates["a"])
    values = {"a": torch.zeros(2)}
    fresh = BestGates()
    fresh.update(9, 10, 1.0, values)
    values["a"] += 1  # the stored values are copies
    assert fresh.gates["a"].tolist() == [0.0, 0.0] and BestGates().gates is None


def _linear_macs(costs: dict[str, float], base: int = 0):
    return lambda keep: base + int(sum(costs[r] * int(m.sum()) for r, m in keep.items()))


def test_masks_at_keep_gates_above_the_threshold_or_the_arg_max():
    masks = masks_at({"a": torch.tensor([0.2, 0.7, 0.5]), "b": torch.tensor([0.1, 0.3])}, 0.5)
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [False, True]


def test_bisection_follows_the_official_steps():
    gates = {"a": torch.arange(1, 10) / 10}  # 0.1 ... 0.9
    result = threshold_gates(gates, 35, _linear_macs({"a": 10}), tolerance=0)
    assert [t for t, _ in result.history[:4]] == [0.5, 0.75, 0.625, 0.5625]
    assert [f for _, f in result.history[:4]] == [40, 20, 30, 40]
    assert result.iterations == 50 and len(result.history) == 50  # never within 0 of 35
    assert result.macs == 30 and result.threshold == 0.625 and result.keep["a"].sum() == 3
    last = threshold_gates(gates, 35, _linear_macs({"a": 10}), tolerance=0, official_last=True)
    assert (last.threshold, last.macs) == result.history[-1]
    official = threshold_gates(gates, 35, _linear_macs({"a": 10}), tolerance=5, official_last=True)
    assert (official.iterations, official.macs) == (1, 40)  # 40 is within 5 of 35: the official loop stops
    ours = threshold_gates(gates, 35, _linear_macs({"a": 10}), tolerance=5)
    assert (ours.iterations, ours.macs) == (3, 30)  # ours stops within 5 at or below 35


@pytest.mark.parametrize("seed", range(5))
def test_bisection_stops_within_tolerance_or_limit_and_never_above_target(seed):
    g = torch.Generator().manual_seed(seed)
    gates = {f"l{i}": torch.rand(n, generator=g) for i, n in enumerate((16, 32, 64, 8))}
    costs = {f"l{i}": float(c) for i, c in enumerate(torch.randint(1_000, 50_000, (4,), generator=g))}
    macs_of = _linear_macs(costs, base=10_000)
    dense = macs_of({r: torch.ones_like(v, dtype=torch.bool) for r, v in gates.items()})
    for fraction in (0.2, 0.45, 0.7, 0.9):
        target = fraction * dense
        for official_last in (False, True):
            result = threshold_gates(gates, target, macs_of, official_last=official_last)
            last = result.history[-1][1]
            within = abs(last - target) <= 50_000 and (official_last or last <= target)
            assert within or result.iterations == 50
            assert not any(abs(f - target) <= 50_000 and (official_last or f <= target) for _, f in result.history[:-1])
            assert result.macs == macs_of(result.keep)
            assert all(m.any() for m in result.keep.values())
            if not official_last:
                assert result.macs <= target
                assert result.macs == max(f for _, f in result.history if f <= target)
                expected = masks_at(gates, result.threshold)
                assert all(torch.equal(result.keep[r], expected[r]) for r in gates)


def test_official_loop_can_stop_above_the_target_and_ours_does_not():
    gates = {"a": torch.tensor([0.2, 0.6, 0.61, 0.9])}
    macs_of = _linear_macs({"a": 100_000})
    last = threshold_gates(gates, 250_000, macs_of, official_last=True)
    assert (last.iterations, last.threshold, last.macs) == (1, 0.5, 300_000)  # |300k - 250k| <= 50k: stop
    ours = threshold_gates(gates, 250_000, macs_of)
    assert (ours.iterations, ours.threshold, ours.macs) == (6, 0.609375, 200_000)  # stops only at or below
    assert [f for _, f in ours.history] == [300_000, 100_000, 100_000, 300_000, 300_000, 200_000]


def test_bisection_falls_back_to_the_minimal_mask_or_says_the_target_is_out_of_reach():
    gates = {"a": torch.ones(4), "b": torch.tensor([0.2, 1.0, 0.3])}  # λ = 1 is above every threshold < 1
    minimal = {"a": [True, False, False, False], "b": [False, True, False]}
    result = threshold_gates(gates, 250, _linear_macs({"a": 100, "b": 50}))  # τ creeps up to 1 (in float32)
    assert result.macs == 150 and {r: m.tolist() for r, m in result.keep.items()} == minimal
    early = threshold_gates(gates, 250, _linear_macs({"a": 100, "b": 50}), iterations=3)
    assert all(f > 250 for _, f in early.history) and (early.threshold, early.macs) == (1.0, 150)
    assert {r: m.tolist() for r, m in early.keep.items()} == minimal
    with pytest.raises(UserError, match="target: 100 MACs is out of reach: keeping one channel per gated layer "
                                        "already costs 150"):
        threshold_gates(gates, 100, _linear_macs({"a": 100, "b": 50}))
    with pytest.raises(UserError, match="target: expected a positive number of MACs"):
        threshold_gates(gates, 0, _linear_macs({"a": 1, "b": 1}))


@pytest.mark.slow
def test_bisection_with_the_real_counter_meets_the_target_on_the_pruned_model():
    model = trained_like("resnet20")
    gated = insert_gates(copy.deepcopy(model), X, residual="scatter")
    gates = random_gates(gate_values(gated), seed=5)
    remove_gates(gated)
    dense = count_macs(model).total
    target = 0.45 * dense
    result = threshold_gates(gates, target, pruned_macs(model, X, scatter=True))
    assert result.macs <= target and (abs(result.history[-1][1] - target) <= 50_000 or result.iterations == 50)
    pruned, _ = prune_channels(model, {r: m.nonzero().flatten() for r, m in result.keep.items()}, X, scatter=True)
    assert count_macs(pruned).total == result.macs
