import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from prunekit.data import TensorLoader
from prunekit.errors import UserError
from prunekit.train import Hook, TrainConfig, Trainer, build_lr_plan
from prunekit.train.trainer import CHECKPOINT_NAME, METRICS_NAME

STATS = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def toy_data(n):
    """Two classes that differ in brightness: learnable in a few epochs by a tiny CNN."""
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 120, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[labels == 1] += 120
    return images, labels


def toy_loaders(n=96, batch_size=16, seed=0):
    images, labels = toy_data(n)
    train = TensorLoader(images, labels, batch_size=batch_size, shuffle=True, augment=True, seed=seed,
                         pad=1, flip=True, **STATS)
    test = TensorLoader(images, labels, batch_size=32, shuffle=False, augment=False, **STATS)
    return train, test


def fixed_loader(n=32, batch_size=16):
    """The same batches in the same order every epoch (no shuffling, no augmentation)."""
    return TensorLoader(*toy_data(n), batch_size=batch_size, shuffle=False, augment=False, **STATS)


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

    def on_step_end(self, trainer, loss):
        self.calls.append("step_end")

    def on_evaluate(self, trainer, metrics):
        self.calls.append("evaluate")

    def on_epoch_end(self, trainer, metrics):
        self.calls.append(f"epoch_end{metrics.epoch}")

    def on_train_end(self, trainer):
        self.calls.append("train_end")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_hook_order_and_lr_plan_applied_every_step(optimizer):
    recorder = Recorder()
    trainer = Trainer(toy_model(), *toy_loaders(), config(epochs=2, optimizer=optimizer), hooks=[recorder])
    trainer.fit()
    steps = len(trainer.train_loader)
    epoch = ["step", "before", "after", "step_end"] * steps
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


def test_bf16_channels_last_path_trains_like_fp32():
    """bf16 autocast rounds activations, so its run stays within a few percent of the fp32 run's
    trajectory: each tensor ends far closer to the fp32 result than the training moved it."""
    initial = toy_model().state_dict()
    fp32 = Trainer(toy_model(), *toy_loaders(), config(epochs=2))
    fp32.fit()
    runs = [Trainer(toy_model(), *toy_loaders(), config(epochs=2, precision="bf16", channels_last=True))
            for _ in range(2)]
    results = [run.fit() for run in runs]
    assert runs[0].precision == "bf16" and runs[0].channels_last
    reference, bf16, again = ({k: v.cpu() for k, v in t.model.state_dict().items()} for t in (fp32, *runs))
    for name, value in reference.items():
        assert torch.equal(bf16[name], again[name]), name  # same seed, same weights
        if value.is_floating_point():
            moved = (value - initial[name]).norm()
            assert (bf16[name] - value).norm() < 0.25 * moved, name
    losses = [m.train_loss for m in results[0].history]
    assert losses[1] < 0.6 * losses[0]
    assert losses == pytest.approx([m.train_loss for m in fp32.history], abs=0.03)
    assert results[0].final_test_acc == 1.0


# ------------------------------------------------------------------ exact references
def manual_run(model, loader, optimizer, steps, seed, train_mode=True):
    """The reference loop: ``steps`` plain forward/backward/step updates over ``loader``'s epochs."""
    torch.manual_seed(seed)
    model.train(train_mode)
    done = 0
    while done < steps:
        for images, labels in loader:
            optimizer.zero_grad()
            # NCHW-contiguous as the Trainer passes them (the memory format steers dropout's draws)
            F.cross_entropy(model(images.contiguous()), labels).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return model


MANUAL = {  # optimizer setting of the Trainer -> the torch optimizer it must equal
    "sgd": (dict(optimizer="sgd", weight_decay=5e-4),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adam": (dict(optimizer="adam", weight_decay=0.0), lambda ps: torch.optim.Adam(ps, lr=0.05)),
    "adamw": (dict(optimizer="adamw", weight_decay=5e-4),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=5e-4)),
}


@pytest.mark.parametrize("optimizer", sorted(MANUAL))
def test_updates_equal_a_manual_loop(optimizer):
    """3 steps over 2-batch epochs: the budget ends inside epoch 2, momentum/Adam state carries over,
    dropout draws from the run's seed."""
    settings, make = MANUAL[optimizer]
    trainer = Trainer(toy_model(), fixed_loader(), None, config(steps=3, lr_plan="constant", **settings), device="cpu")
    trainer.fit()
    model = toy_model()
    manual_run(model, fixed_loader(), make(model.parameters()), steps=3, seed=7)
    for name, value in model.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-7), name
    assert trainer.global_step == 3 and [m.epoch for m in trainer.history] == [1, 2]


# ---------------------------------------------------------------------- step budgets
class StepLog(Hook):
    """Every step's index, LR and the loss handed to ``on_step_end``."""

    def __init__(self):
        self.steps, self.lrs, self.losses, self.evaluated = [], [], [], []

    def before_optimizer_step(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, trainer, loss):
        self.steps.append(trainer.global_step)
        self.losses.append(loss)

    def on_evaluate(self, trainer, metrics):
        self.evaluated.append(metrics.epoch)


@pytest.mark.parametrize("steps, epochs", [(4, 1), (10, 2), (12, 2)])
def test_step_budget_ends_mid_epoch_with_the_lr_plan_over_the_steps(steps, epochs):
    log = StepLog()
    trainer = Trainer(toy_model(), *toy_loaders(), config(steps=steps, eval_every=5), hooks=[log])  # 6 steps/epoch
    result = trainer.fit()
    assert (trainer.total_steps, trainer.total_epochs, trainer.global_step) == (steps, epochs, steps)
    assert trainer.progress == 1.0 and log.steps == list(range(steps))
    assert [m.epoch for m in result.history] == list(range(1, epochs + 1))
    assert log.evaluated == [epochs] and result.final_test_acc == result.history[-1].test_acc is not None
    reference = build_lr_plan("onecycle", lr=0.05, epochs=epochs, steps_per_epoch=6, total_steps=steps)
    assert log.lrs == pytest.approx([reference.lr(s) for s in range(steps)])
    assert log.lrs[-1] == pytest.approx(0.05 / 25 / 1e4)  # the plan ends exactly at the budget's last step


def test_step_budget_resumes_to_identical_weights(tmp_path):
    budget = config(steps=10, epochs=99)  # epochs is unused under a step budget
    reference = Trainer(toy_model(), *toy_loaders(), budget, run_dir=tmp_path / "a")
    reference.fit()
    with pytest.raises(Killed):
        Trainer(toy_model(), *toy_loaders(), budget, run_dir=tmp_path / "b", hooks=[KillAtStep(8)]).fit()
    resumed = Trainer(toy_model(), *toy_loaders(), budget, run_dir=tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.global_step == reference.global_step == 10
    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    lines = [json.loads(x) for x in (tmp_path / "b" / METRICS_NAME).read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in reference.history]


def test_retraining_plan_refuses_a_budget_of_partial_epochs():
    with pytest.raises(UserError, match=r"^steps: a retraining plan runs whole epochs, 2 x 6 = 12 steps, not 10$"):
        Trainer(toy_model(), *toy_loaders(), config(steps=10, lr_plan="finetune"))
    Trainer(toy_model(), *toy_loaders(), config(steps=12, lr_plan="finetune"))  # whole epochs are fine


# ----------------------------------------------------------------------- step losses
class CaptureLoss(Hook):
    """Recomputes each step's loss from the forward pass (before the update) and adds a penalty."""

    def __init__(self):
        self.expected, self.seen = [], []

    def extra_loss(self, trainer, outputs, targets):
        term = 0.25 * trainer.model[-1].weight.pow(2).sum()
        self.expected.append((F.cross_entropy(outputs.float(), targets) + term).detach())
        return term

    def on_step_end(self, trainer, loss):
        self.seen.append(loss)


def test_on_step_end_receives_the_backpropagated_loss_of_the_step():
    hook = CaptureLoss()
    Trainer(toy_model(), *toy_loaders(), config(epochs=1), hooks=[hook]).fit()
    assert len(hook.seen) == 6
    for loss, expected in zip(hook.seen, hook.expected):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
        assert torch.equal(loss, expected)


# ----------------------------------------------------------------------- frozen mode
class ModeProbe(Hook):
    def __init__(self):
        self.training, self.conv_grads = set(), []

    def before_optimizer_step(self, trainer):
        self.training |= {m.training for m in trainer.model.modules()}
        self.conv_grads.append(trainer.model[0].weight.grad)


def test_frozen_mode_trains_only_the_chosen_parameters_in_eval_mode():
    model, probe = toy_model(), ModeProbe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, *toy_loaders(), config(epochs=2, trainable=["6.*"], eval_mode=True), hooks=[probe])
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in optimized] == [id(model[6].weight), id(model[6].bias)]
    trainer.fit()
    after = {k: v.cpu() for k, v in model.state_dict().items()}  # the Trainer may have moved it to a GPU
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["6.weight", "6.bias"]
    assert probe.training == {False} and probe.conv_grads == [None] * 12  # no dropout, no gradient for frozen
    assert all(p.requires_grad for p in model.parameters())  # frozen only for the run

    train_mode = toy_model()
    Trainer(train_mode, *toy_loaders(), config(epochs=1, trainable=("6.*",))).fit()
    assert not torch.equal(train_mode[1].running_mean.cpu(), before["1.running_mean"])  # train mode: BN stats move
    assert torch.equal(train_mode[0].weight.cpu(), before["0.weight"])


def test_frozen_mode_equals_a_manual_loop_over_the_chosen_parameters():
    frozen = config(steps=3, lr_plan="constant", trainable=("1.*", "6.bias"), eval_mode=True)
    trainer = Trainer(toy_model(), fixed_loader(), None, frozen, device="cpu")
    trainer.fit()
    model = toy_model()
    chosen = [model[1].weight, model[1].bias, model[6].bias]
    manual_run(model, fixed_loader(), torch.optim.SGD(chosen, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
               steps=3, seed=7, train_mode=False)
    for name, value in model.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-7), name


def test_frozen_parameters_thaw_when_the_run_dies():
    model = toy_model()
    with pytest.raises(Killed):
        Trainer(model, *toy_loaders(), config(trainable=("6.*",)), hooks=[KillAtStep(2)]).fit()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps: expected an integer in [1, 100,000,000] or None, got 0"),
    (dict(steps=10**12), "steps: expected an integer in [1, 100,000,000] or None, got 1000000000000"),
    (dict(epochs=10**12), "epochs: expected an integer in [1, 10,000], got 1000000000000"),
    (dict(scale_lr="sqrt"), "scale_lr: expected one of none, linear, got 'sqrt'"),
    (dict(steps=2.5), "steps: expected an integer in [1, 100,000,000] or None, got 2.5"),
    (dict(steps=True), "steps: expected an integer in [1, 100,000,000] or None, got True"),
    (dict(trainable=[]), "trainable: expected a non-empty list of parameter-name patterns or None, got []"),
    (dict(trainable="6.*"), "trainable: expected a non-empty list of parameter-name patterns or None, got '6.*'"),
    (dict(eval_mode="yes"), "eval_mode: expected true or false, got 'yes'"),
    (dict(optimizer="adamax"), "optimizer: expected one of sgd, adam, adamw, got 'adamax'"),
])
def test_config_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError) as error:
        config(**overrides)
    assert str(error.value) == message


def test_trainable_pattern_matching_nothing_is_refused():
    with pytest.raises(UserError, match=r"^trainable: pattern 'head\.\*' matches no parameter name of the model "
                                        r"\(such as '0\.weight'\)$"):
        Trainer(toy_model(), *toy_loaders(), config(trainable=("6.*", "head.*")))
