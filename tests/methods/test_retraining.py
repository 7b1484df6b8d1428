"""Retraining after pruning (METHODS §2.4): the LR plans' worked examples and weight rewinding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.data import TensorLoader
from prunekit.errors import UserError
from prunekit.methods.filter_config import global_magnitude, prune_filters
from prunekit.methods.retraining import (RecordRewindPoints, load_rewind_point, rewind_epochs, rewind_point_path,
                                         rewind_weights, rewind_weights_from_spec, save_rewind_point)
from prunekit.models import build_model
from prunekit.train import Hook, TrainConfig, Trainer
from prunekit.train.lr_plans import (LR_PLANS, RETRAINING_PLANS, LRRewind, WeightRewind, build_lr_plan, epoch_table,
                                     original_schedule)


def per_epoch(name, budget, steps_per_epoch=1, **args):
    plan = build_lr_plan(name, epochs=budget, steps_per_epoch=steps_per_epoch, **args)
    return [row["lr"] for row in epoch_table(plan, steps_per_epoch)]


# ------------------------------------------------------------------ scaled LR restarting (§2.4.4)
def test_scaled_restart_t72_worked_example():
    lrs = per_epoch("scaled_restart", 72, steps_per_epoch=5)
    listed = {0: 0.001, 1: 0.0059, 3: 0.0395, 6: 0.0951}
    for epoch, lr in listed.items():
        assert lrs[epoch] == pytest.approx(lr, abs=5e-5), epoch
    assert lrs[7:39] == pytest.approx([0.1] * 32)
    assert lrs[39:55] == pytest.approx([0.01] * 16)
    assert lrs[55:72] == pytest.approx([0.001] * 17)
    assert len(lrs) == 72
    # the warm-up is the cosine ramp from 0.001 (epoch 0) to 0.1 (epoch W = 7), strictly rising
    for e in range(8):
        assert lrs[e] == pytest.approx(0.1 + (0.001 - 0.1) * (1 + math.cos(math.pi * e / 7)) / 2)
    assert all(a < b for a, b in zip(lrs[:7], lrs[1:8]))


def test_scaled_restart_steps_per_epoch_and_presets():
    plan = build_lr_plan("scaled_restart", epochs=72, steps_per_epoch=4)
    assert (plan.warmup_epochs, plan.milestones) == (7, [32, 48])
    assert {plan.lr(s) for s in range(4, 8)} == {plan.lr(4)}  # stepped per epoch
    imagenet = build_lr_plan("scaled_restart", epochs=45, steps_per_epoch=1, preset="imagenet")
    assert (imagenet.warmup_epochs, imagenet.milestones) == (4, [13, 26])  # ⌊0.297·45⌋, ⌊0.594·45⌋
    short = per_epoch("scaled_restart", 5)  # W = 0: no warm-up; m₁ = ⌊2.25⌋ = 2, m₂ = ⌊3.375⌋ = 3
    assert short == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    with pytest.raises(UserError, match="preset: expected one of cifar, imagenet"):
        build_lr_plan("scaled_restart", epochs=10, steps_per_epoch=1, preset="mnist")


# ------------------------------------------------------------------ LR rewinding (§2.4.3)
def cifar_closed_form(t, e):
    """METHODS §2.4.3, CIFAR (T = 160, drops at 80/120)."""
    if t > 80:
        return 0.1 if e < t - 80 else 0.01 if e < t - 40 else 0.001
    if t > 40:
        return 0.01 if e < t - 40 else 0.001
    return 0.001


def test_lr_rewind_t72_and_t120_on_the_cifar_schedule():
    assert per_epoch("lr_rewind", 72, original_epochs=160) == pytest.approx([0.01] * 32 + [0.001] * 40)
    assert per_epoch("lr_rewind", 120, original_epochs=160) == pytest.approx([0.1] * 40 + [0.01] * 40 + [0.001] * 40)


def test_lr_rewind_matches_the_cifar_closed_form_for_every_budget():
    for t in range(1, 161):
        lrs = per_epoch("lr_rewind", t, original_epochs=160)
        assert lrs == pytest.approx([cifar_closed_form(t, e) for e in range(t)]), t


@pytest.mark.parametrize("t", [1, 24, 40])
def test_lr_rewind_with_a_budget_up_to_40_is_fine_tuning(t):
    assert per_epoch("lr_rewind", t, original_epochs=160) == pytest.approx(per_epoch("finetune", t))


def reference_imagenet_rule(t, e):
    """The authors' ImageNet rule: milestones t − 30k, k = ⌊t/30⌋ … 1; start at 0.001·10^#milestones."""
    milestones = [t - 30 * k for k in range(t // 30, 0, -1)]
    return 0.001 * 10 ** len(milestones) * 0.1 ** sum(e >= m for m in milestones)


def test_lr_rewind_imagenet_t45_and_the_multiples_of_30():
    t45 = per_epoch("lr_rewind", 45, original_epochs=90, preset="imagenet")
    assert t45 == pytest.approx([0.01] * 15 + [0.001] * 30)
    for t in range(1, 91):
        lrs = per_epoch("lr_rewind", t, original_epochs=90, preset="imagenet")
        assert max(lrs) <= 0.1 + 1e-12
        if t % 30:
            assert lrs == pytest.approx([reference_imagenet_rule(t, e) for e in range(t)]), t
    # where the reference rule breaks (a milestone at 0, a start LR of 1.0), the generic form replays the run
    assert per_epoch("lr_rewind", 90, original_epochs=90, preset="imagenet") == pytest.approx(
        [0.1] * 30 + [0.01] * 30 + [0.001] * 30)
    t60 = per_epoch("lr_rewind", 60, original_epochs=90, preset="imagenet")
    assert t60 == pytest.approx([0.01] * 30 + [0.001] * 30)


def test_lr_rewind_is_stepped_per_epoch_and_weight_rewind_shares_it():
    lrw = build_lr_plan("lr_rewind", epochs=72, steps_per_epoch=7, original_epochs=160)
    wr = build_lr_plan("weight_rewind", epochs=72, steps_per_epoch=7, original_epochs=160)
    assert isinstance(wr, WeightRewind) and wr.rewind_epoch == lrw.rewind_epoch == 88
    assert [wr.lr(s) for s in range(lrw.total_steps)] == [lrw.lr(s) for s in range(lrw.total_steps)]
    assert lrw.lr(31 * 7 + 6) == pytest.approx(0.01) and lrw.lr(32 * 7) == pytest.approx(0.001)
    assert lrw.momentum(0) is None


def test_lr_rewind_replays_any_original_schedule():
    # an LRPlan of the original run (its own steps per epoch), a name, a function
    original = build_lr_plan("cosine", lr=0.1, epochs=40, steps_per_epoch=3)
    plan = build_lr_plan("lr_rewind", epochs=10, steps_per_epoch=5, original_epochs=40, original=original)
    assert plan.lr(0) == pytest.approx(original.lr(30 * 3))
    assert plan.lr(9 * 5 + 4) == pytest.approx(original.lr(39 * 3))
    by_name = build_lr_plan("lr_rewind", epochs=10, steps_per_epoch=5, original_epochs=40, original="onecycle",
                            per_iteration=True)
    reference = build_lr_plan("onecycle", lr=0.1, epochs=40, steps_per_epoch=5)
    assert [by_name.lr(s) for s in range(50)] == pytest.approx([reference.lr(150 + s) for s in range(50)])
    assert [by_name.momentum(s) for s in range(50)] == pytest.approx([reference.momentum(150 + s) for s in range(50)])
    func = build_lr_plan("lr_rewind", epochs=4, steps_per_epoch=1, original_epochs=10, original=lambda e: e / 100)
    assert [func.lr(s) for s in range(4)] == pytest.approx([0.06, 0.07, 0.08, 0.09])
    custom = original_schedule(original_epochs=40, milestones=[20, 30])
    assert [custom.lr(e) for e in (19, 20, 30)] == pytest.approx([0.1, 0.01, 0.001])


def test_rewinding_plans_refuse_bad_budgets():
    with pytest.raises(UserError, match="epochs: a rewinding budget of t=161 epochs exceeds"):
        build_lr_plan("lr_rewind", epochs=161, steps_per_epoch=1, original_epochs=160)
    with pytest.raises(UserError, match="original_epochs: the 'weight_rewind' LR plan needs it"):
        build_lr_plan("weight_rewind", epochs=10, steps_per_epoch=1)
    with pytest.raises(UserError, match="original: 'finetune' is a retraining plan"):
        build_lr_plan("lr_rewind", epochs=10, steps_per_epoch=1, original_epochs=40, original="finetune")


# ------------------------------------------------------------------ FT and 1-cycle (§2.4.1, §2.4.5)
def test_finetune_is_constant_and_takes_an_lr():
    assert per_epoch("finetune", 300) == [0.001] * 300
    assert set(per_epoch("finetune", 3, lr=0.005)) == {0.005}


def test_cyclic_restart_start_peak_end_and_momentum():
    plan = build_lr_plan("cyclic_restart", epochs=10, steps_per_epoch=100)
    peak = 0.1 * 1000 - 1
    assert plan.lr(0) == pytest.approx(0.001)
    assert plan.lr(peak) == pytest.approx(0.1)
    assert plan.lr(999) == pytest.approx(1e-5)
    assert max(plan.lr(s) for s in range(1000)) == pytest.approx(0.1)
    assert [plan.momentum(s) for s in (0, peak, 999)] == pytest.approx([0.95, 0.85, 0.95])
    assert plan.lr(1) > plan.lr(0)  # per iteration, not per epoch
    assert epoch_table(plan, 100)[0] == {"epoch": 0, "lr": plan.lr(0), "momentum": plan.momentum(0)}


def test_cyclic_restart_equals_torch_onecycle_with_nptm_settings():
    steps = 6 * 9
    plan = build_lr_plan("cyclic_restart", epochs=6, steps_per_epoch=9)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.1,
                                                    div_factor=100, final_div_factor=100)
    for step in range(steps):
        assert plan.lr(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        assert plan.momentum(step) == pytest.approx(optimizer.param_groups[0]["momentum"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_registry_holds_every_retraining_plan_once():
    assert set(RETRAINING_PLANS) <= set(LR_PLANS.names())
    assert {"constant", "step", "cosine", "onecycle"} <= set(LR_PLANS.names())
    assert issubclass(LR_PLANS.get("weight_rewind"), LRRewind)


# ------------------------------------------------------------------ weight rewinding (§2.4.2)
def perturbed(model, seed):
    """A copy of the model's state with every float tensor changed (a stand-in for an earlier epoch)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def test_rewind_epochs_for_budgets():
    assert rewind_epochs(160, [40, 72, 72, 160]) == [0, 88, 120]
    with pytest.raises(UserError, match=r"budgets: expected retraining budgets in \[1, 40\]"):
        rewind_epochs(40, [41])


def test_weight_rewinding_restores_the_saved_weights_under_the_current_masks(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20")
    saved = perturbed(model, 1)
    path = save_rewind_point(_loaded(build_model("resnet20"), saved), tmp_path / "epoch-0030.safetensors", 30)
    sparsifier = global_magnitude(model, 0.7)
    masks = {name: mask.clone() for name, mask in sparsifier.masks().items()}
    rewind_weights(model, load_rewind_point(path))
    modules = dict(model.named_modules())
    for name, value in model.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith("weight") and layer in masks:
            assert torch.equal(value, saved[name] * masks[layer]), name
        else:
            assert torch.equal(value, saved[name]), name  # BN, FC and running statistics come back as saved
    assert all(torch.equal(modules[n].weight_mask, m) for n, m in masks.items())  # masks untouched
    assert sparsifier.realised_sparsity().total == pytest.approx(0.7, abs=1e-4)


def _loaded(model, state):
    model.load_state_dict(state)
    return model


def test_weight_rewinding_of_a_compacted_model_slices_the_snapshot(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20")
    saved = perturbed(model, 2)
    result = prune_filters(model, "resnet20-B")
    rewind_weights(model, saved, manifest=result.manifest, dense=build_model("resnet20"),
                   example_input=torch.zeros(1, 3, 32, 32))
    kept = result.manifest.keep()
    block = "layer1.0"
    idx = kept[f"{block}.conv1"]
    state = model.state_dict()
    assert torch.equal(state[f"{block}.conv1.weight"], saved[f"{block}.conv1.weight"][idx])
    assert torch.equal(state[f"{block}.bn1.running_mean"], saved[f"{block}.bn1.running_mean"][idx])
    assert torch.equal(state[f"{block}.conv2.weight"], saved[f"{block}.conv2.weight"][:, idx])
    assert torch.equal(state["conv1.weight"], saved["conv1.weight"])  # stem is not pruned
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the same through a saved artifact (the manifest travels in model.json)
    spec = ModelSpec(model="resnet20", num_classes=10)
    save_artifact(model, spec, tmp_path / "pruned", manifest=result.manifest)
    again, spec = load_artifact(tmp_path / "pruned")
    rewind_weights_from_spec(again, saved, spec)
    assert [k for k, v in again.state_dict().items() if not torch.equal(v, state[k])] == []


def test_rewind_refuses_a_snapshot_of_another_model():
    with pytest.raises(UserError, match="rewind point: does not fit the model"):
        rewind_weights(build_model("resnet20"), build_model("resnet32").state_dict())
    with pytest.raises(UserError, match="dense: rewinding a compacted model needs"):
        rewind_weights(build_model("resnet20"), {}, manifest={"format": "x"})


class Snapshots(Hook):
    """Copies of the model's state after every epoch (and before the first)."""

    def __init__(self):
        self.states = {}

    def on_train_begin(self, trainer):
        self.states[0] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def on_epoch_end(self, trainer, metrics):
        self.states[trainer.epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_the_original_training_records_the_rewind_points_its_budgets_need(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (16, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (16,), generator=g)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    train = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=False, seed=0, **stats)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    record, copies = RecordRewindPoints.for_budgets(4, [1, 2, 4]), Snapshots()
    config = TrainConfig(epochs=4, lr=0.1, precision="fp32", channels_last=False, lr_plan="step",
                         lr_plan_args={"milestones": [2, 3]})
    Trainer(model, train, None, config, hooks=[copies, record], run_dir=tmp_path, device="cpu").fit()
    assert record.epochs == [0, 2, 3]
    assert sorted(p.name for p in (tmp_path / "rewind").iterdir()) == [
        "epoch-0000.safetensors", "epoch-0002.safetensors", "epoch-0003.safetensors"]  # no temporary files
    for epoch in record.epochs:
        loaded = load_rewind_point(tmp_path, epoch)
        assert loaded.keys() == copies.states[epoch].keys()
        assert all(torch.equal(loaded[k], copies.states[epoch][k]) for k in loaded), epoch
    assert not torch.equal(load_rewind_point(tmp_path, 2)["0.weight"], load_rewind_point(tmp_path, 3)["0.weight"])
    assert rewind_point_path(tmp_path / "rewind", 3) == record.saved[3]
    with pytest.raises(UserError, match=r"rewind point: .*epoch-0001.safetensors' does not exist \(saved: epoch-0000"):
        load_rewind_point(tmp_path, 1)


def test_record_rewind_points_needs_a_place_and_a_reachable_epoch(tmp_path):
    hook = RecordRewindPoints([5])

    class FakeTrainer:
        run_dir, epoch, total_epochs = None, 0, 3

    with pytest.raises(UserError, match=r"epochs: rewind points \[5\] lie beyond the run's 3 epochs"):
        hook.on_train_begin(FakeTrainer())
    with pytest.raises(UserError, match="directory: RecordRewindPoints needs a directory"):
        RecordRewindPoints([0]).on_train_begin(FakeTrainer())
