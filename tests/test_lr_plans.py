import math

import pytest
import torch

from prunekit.errors import UserError
from prunekit.train.lr_plans import LR_PLANS, build_lr_plan


def torch_schedule(scheduler_factory, steps):
    """LR and momentum torch's own scheduler uses at each of ``steps`` optimizer steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = scheduler_factory(optimizer)
    lrs, momenta = [], []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    return lrs, momenta


@pytest.mark.parametrize("pct_start", [0.1, 0.25, 0.3])
def test_onecycle_equals_torch_onecycle_at_every_step(pct_start):
    steps = 97
    plan = build_lr_plan("onecycle", lr=0.1, epochs=1, steps_per_epoch=steps, pct_start=pct_start,
                         div_factor=100, final_div_factor=100)
    lrs, momenta = torch_schedule(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=steps, pct_start=pct_start, div_factor=100, final_div_factor=100), steps)
    for step in range(steps):
        assert plan.lr(step) == pytest.approx(lrs[step], rel=1e-9, abs=1e-12)
        assert plan.momentum(step) == pytest.approx(momenta[step], rel=1e-9)


def test_onecycle_endpoints_match_methods_2_4():
    # NPTM's CLR: start 0.001, peak 0.1 at 10 % of the steps, end 1e-5, momentum 0.95 -> 0.85 -> 0.95.
    plan = build_lr_plan("onecycle", lr=0.1, epochs=10, steps_per_epoch=100, pct_start=0.1,
                         div_factor=100, final_div_factor=100)
    peak = round(0.1 * 1000) - 1
    assert plan.lr(0) == pytest.approx(0.001)
    assert plan.lr(peak) == pytest.approx(0.1)
    assert plan.lr(999) == pytest.approx(1e-5)
    assert plan.momentum(0) == pytest.approx(0.95)
    assert plan.momentum(peak) == pytest.approx(0.85)
    assert plan.momentum(999) == pytest.approx(0.95)


def test_step_plan_equals_torch_multistep():
    steps_per_epoch, epochs = 7, 40
    plan = build_lr_plan("step", lr=0.1, epochs=epochs, steps_per_epoch=steps_per_epoch, milestones=[20, 30])
    lrs, _ = torch_schedule(lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [20, 30], 0.1), epochs)
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            assert plan.lr(epoch * steps_per_epoch + i) == pytest.approx(lrs[epoch])


def test_step_plan_accepts_fractions_of_the_run():
    plan = build_lr_plan("step", lr=1.0, epochs=10, steps_per_epoch=10, milestones=[0.5, 0.75])
    assert [plan.lr(s) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_a_step_budget_sets_the_plan_length_and_fraction_milestones():
    plan = build_lr_plan("step", lr=1.0, epochs=2, steps_per_epoch=6, total_steps=10, milestones=[0.5, 1])
    assert plan.total_steps == 10
    # milestone 0.5 = half of the 10 steps (step 5), milestone 1 = epoch 1 (step 6)
    assert [plan.lr(s) for s in (4, 5, 6, 9)] == pytest.approx([1.0, 0.1, 0.01, 0.01])
    cosine = build_lr_plan("cosine", lr=0.2, epochs=1, steps_per_epoch=391, total_steps=200)
    assert cosine.lr(199) == pytest.approx(0.0) and cosine.lr(99) > 0.09


def test_cosine_warmup_then_decay_to_min():
    plan = build_lr_plan("cosine", lr=0.2, epochs=10, steps_per_epoch=10, warmup_epochs=1, min_lr=0.002)
    assert plan.lr(0) == pytest.approx(0.02)
    assert plan.lr(9) == pytest.approx(0.2)
    assert plan.lr(99) == pytest.approx(0.002)
    middle = 10 + (99 - 10) / 2
    assert plan.lr(round(middle)) == pytest.approx(0.002 + 0.198 * (1 + math.cos(math.pi * (round(middle) - 10) / 89)) / 2)


def test_constant_plan_and_registry():
    plan = build_lr_plan("constant", lr=0.001, epochs=3, steps_per_epoch=5)
    assert {plan.lr(s) for s in range(15)} == {0.001}
    assert plan.momentum(3) is None
    assert set(LR_PLANS.names()) >= {"constant", "step", "cosine", "onecycle"}


def test_unknown_plan_and_argument_are_user_errors():
    with pytest.raises(UserError, match="unknown LR plan 'cosin'.*cosine"):
        build_lr_plan("cosin", lr=0.1, epochs=1, steps_per_epoch=1)
    with pytest.raises(UserError, match="^unknown LR plan 'one_cycle'; known: .*cyclic_restart"):
        build_lr_plan("one_cycle", epochs=1, steps_per_epoch=1)  # NPTM's CLR plan is cyclic_restart now
    with pytest.raises(UserError, match="lr_plan_args: 'step' does not take warmup"):
        build_lr_plan("step", lr=0.1, epochs=1, steps_per_epoch=1, warmup=3)
    with pytest.raises(UserError, match="pct_start"):
        build_lr_plan("onecycle", lr=0.1, epochs=1, steps_per_epoch=10, pct_start=1.5)
