import json

import pytest
import torch
from torch import nn

from prunekit.data import TensorLoader
from prunekit.train import Hook, TrainConfig, Trainer
from prunekit.train.trainer import CHECKPOINT_NAME, METRICS_NAME


def toy_loaders(n=96, batch_size=16, seed=0):
    """Two classes that differ in brightness: learnable in a few epochs by a tiny CNN."""
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[labels == 1] += 120
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    train = TensorLoader(images, labels, batch_size=batch_size, shuffle=True, augment=True, seed=seed,
                         pad=1, flip=True, **stats)
    test = TensorLoader(images, labels, batch_size=32, shuffle=False, augment=False, **stats)
    return train, test


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def config(**overrides):
    base = dict(epochs=3, lr=0.05, precision="fp32", channels_last=False, lr_plan="onecycle", seed=7)
    return TrainConfig(**{**base, **overrides})


class Killed(Exception):
    pass


class KillAtStep(Hook):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, trainer):
        if trainer.global_step == self.step:
            raise Killed


class StepCounter(Hook):
    def __init__(self):
        self.steps = 0

    def after_optimizer_step(self, trainer):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_resume_after_kill_ends_with_identical_weights(tmp_path):
    reference = Trainer(toy_model(), *toy_loaders(), config(), run_dir=tmp_path / "a")
    reference.fit()

    interrupted = Trainer(toy_model(), *toy_loaders(), config(), run_dir=tmp_path / "b",
                          hooks=[StepCounter(), KillAtStep(9)])  # 6 steps per epoch: dies in epoch 2
    with pytest.raises(Killed):
        interrupted.fit()
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1

    counter = StepCounter()
    resumed = Trainer(toy_model(), *toy_loaders(), config(), run_dir=tmp_path / "b", hooks=[counter])
    resumed.fit(resume=True)
    assert counter.steps == reference.global_step == 18  # hook state came back from the checkpoint

    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    lines_a = [json.loads(x) for x in (tmp_path / "a" / METRICS_NAME).read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / METRICS_NAME).read_text().splitlines()]
    assert [x["epoch"] for x in lines_b] == [1, 2, 3]
    for a, b in zip(lines_a, lines_b):
        assert (a["train_loss"], a["test_acc"]) == (b["train_loss"], b["test_acc"])


def test_fresh_start_ignores_existing_checkpoint_only_when_asked(tmp_path):
    first = Trainer(toy_model(), *toy_loaders(), config(epochs=1), run_dir=tmp_path)
    first.fit()
    again = Trainer(toy_model(), *toy_loaders(), config(epochs=2), run_dir=tmp_path)
    again.fit(resume=True)
    assert [m.epoch for m in again.history] == [1, 2]
    assert again.global_step == 2 * len(again.train_loader)


def test_trainer_learns_and_reports_final_and_best(tmp_path):
    trainer = Trainer(toy_model(), *toy_loaders(), config(epochs=6, lr=0.1))
    result = trainer.fit()
    assert result.final_test_acc == result.history[-1].test_acc
    assert result.final_test_acc >= 0.9
    assert result.best_test_acc == max(m.test_acc for m in result.history)
    assert result.history[result.best_epoch - 1].test_acc == result.best_test_acc
    summary = result.summary()
    assert summary["final_test_acc"] == result.final_test_acc
    assert "best_test_acc_optimistic" in summary


class Recorder(Hook):
    def __init__(self):
        self.calls, self.lrs, self.momenta = [], [], []

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.calls.append(f"epoch_begin{epoch}")

    def on_step_begin(self, trainer):
        self.calls.append("step")

    def before_optimizer_step(self, trainer):
        group = trainer.optimizer.param_groups[0]
        self.lrs.append(group["lr"])
        self.momenta.append(group["momentum"] if "momentum" in group else group["betas"][0])
        self.calls.append("before")

    def after_optimizer_step(self, trainer):
        self.calls.append("after")

    def on_evaluate(self, trainer, metrics):
        self.calls.append("evaluate")

    def on_epoch_end(self, trainer, metrics):
        self.calls.append(f"epoch_end{metrics.epoch}")

    def on_train_end(self, trainer):
        self.calls.append("train_end")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hook_order_and_lr_plan_applied_every_step(optimizer):
    recorder = Recorder()
    trainer = Trainer(toy_model(), *toy_loaders(), config(epochs=2, optimizer=optimizer), hooks=[recorder])
    trainer.fit()
    steps = len(trainer.train_loader)
    epoch = ["step", "before", "after"] * steps
    assert recorder.calls == (["train_begin", "epoch_begin0", *epoch, "evaluate", "epoch_end1",
                               "epoch_begin1", *epoch, "evaluate", "epoch_end2", "train_end"])
    plan = trainer.lr_plan
    assert recorder.lrs == pytest.approx([plan.lr(s) for s in range(2 * steps)])
    assert recorder.momenta == pytest.approx([plan.momentum(s) for s in range(2 * steps)])


class ShrinkClassifier(Hook):
    def extra_loss(self, trainer, outputs, targets):
        return 1.0 * trainer.model[-1].weight.pow(2).sum()


def test_extra_loss_from_a_hook_enters_the_gradient():
    plain = Trainer(toy_model(), *toy_loaders(), config(epochs=2))
    plain.fit()
    penalised = Trainer(toy_model(), *toy_loaders(), config(epochs=2), hooks=[ShrinkClassifier()])
    penalised.fit()
    assert penalised.model[-1].weight.norm() < 0.5 * plain.model[-1].weight.norm()


def test_checkpoint_holds_no_pickled_objects(tmp_path):
    trainer = Trainer(toy_model(), *toy_loaders(), config(epochs=1), run_dir=tmp_path)
    trainer.fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert {"model", "optimizer", "rng", "hooks", "history", "epoch", "global_step"} <= state.keys()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_bf16_channels_last_path_trains():
    trainer = Trainer(toy_model(), *toy_loaders(), config(epochs=2, precision="bf16", channels_last=True))
    result = trainer.fit()
    assert trainer.precision == "bf16" and trainer.channels_last
    assert result.final_test_acc is not None and result.history[-1].train_loss < result.history[0].train_loss + 1
