"""Learning-rate plans: the LR (and momentum) at any optimizer step, as plain objects.

A plan is a pure function of the global step, so plots and tests can read it without
training and a resumed run needs only its step counter. The Trainer writes the values
into the optimizer before every step (per-iteration scheduling).

Besides the plans of a training run (``constant``, ``step``, ``cosine``, ``onecycle``), the
retraining plans of METHODS §2.4 (Network Pruning That Matters) describe a retraining phase of
``epochs`` = t epochs after an original training of ``original_epochs`` = T epochs:
``finetune``, ``lr_rewind``, ``weight_rewind``, ``scaled_restart`` and ``cyclic_restart``.
(The sparsity schedule ``one_cycle`` of One-Cycle Pruning is another thing: :mod:`prunekit.core.schedules`.)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Union

from prunekit.errors import UserError
from prunekit.registry import Registry


class LRPlan:
    """Base class: ``lr(step)`` for step in [0, total_steps); ``momentum(step)`` or None."""

    def __init__(self, total_steps: int) -> None:
        if total_steps < 1:
            raise UserError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        self.total_steps = total_steps

    def lr(self, step: int) -> float:
        raise NotImplementedError

    def momentum(self, step: int) -> float | None:
        """Momentum (SGD) or beta1 (Adam) to use at ``step``; None leaves it unchanged."""
        return None


LR_PLANS: Registry[Callable[..., LRPlan]] = Registry("LR plan")


def cos_anneal(start: float, end: float, fraction: float) -> float:
    """Cosine interpolation from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


@LR_PLANS.register("constant")
class ConstantLR(LRPlan):
    def __init__(self, total_steps: int, lr: float) -> None:
        super().__init__(total_steps)
        self.base_lr = lr

    def lr(self, step: int) -> float:
        return self.base_lr


@LR_PLANS.register("step")
class StepLR(LRPlan):
    """Multiply the LR by ``gamma`` at each milestone (in epochs, or fractions of the run's steps if < 1)."""

    def __init__(self, total_steps: int, lr: float, steps_per_epoch: int,
                 milestones: list[float] = (0.5, 0.75), gamma: float = 0.1) -> None:
        super().__init__(total_steps)
        self.base_lr, self.gamma = lr, gamma
        self.step_milestones = sorted(round(m * total_steps) if 0 < m < 1 else round(m * steps_per_epoch)
                                      for m in milestones)

    def lr(self, step: int) -> float:
        passed = sum(step >= m for m in self.step_milestones)
        return self.base_lr * self.gamma**passed


@LR_PLANS.register("cosine")
class CosineLR(LRPlan):
    """Optional linear warm-up, then cosine decay to ``min_lr`` at the last step."""

    def __init__(self, total_steps: int, lr: float, steps_per_epoch: int, warmup_epochs: float = 0.0,
                 min_lr: float = 0.0) -> None:
        super().__init__(total_steps)
        self.base_lr, self.min_lr = lr, min_lr
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        return cos_anneal(self.base_lr, self.min_lr, min(1.0, (step - self.warmup_steps) / span))


@LR_PLANS.register("onecycle")
class OneCycleLR(LRPlan):
    """PyTorch ``OneCycleLR`` (two-phase cosine) with momentum cycling, per iteration.

    ``lr`` is the peak; the run starts at lr/div_factor and ends at lr/div_factor/final_div_factor.
    Momentum goes max_momentum -> base_momentum while the LR rises, and back while it falls.
    """

    def __init__(self, total_steps: int, lr: float, pct_start: float = 0.25, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, base_momentum: float = 0.85, max_momentum: float = 0.95,
                 cycle_momentum: bool = True) -> None:
        super().__init__(total_steps)
        if not 0 < pct_start < 1:
            raise UserError(f"pct_start: expected a fraction in (0, 1), got {pct_start!r}")
        self.peak = lr
        self.start = lr / div_factor
        self.end = self.start / final_div_factor
        self.phase1_end = float(pct_start * total_steps) - 1
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.cycle_momentum = cycle_momentum

    def _phase(self, step: int) -> tuple[int, float]:
        if step <= self.phase1_end:
            return 0, step / self.phase1_end if self.phase1_end > 0 else 1.0
        span = self.total_steps - 1 - self.phase1_end
        return 1, min(1.0, (step - self.phase1_end) / span) if span > 0 else 1.0

    def lr(self, step: int) -> float:
        phase, frac = self._phase(step)
        return cos_anneal(self.start, self.peak, frac) if phase == 0 else cos_anneal(self.peak, self.end, frac)

    def momentum(self, step: int) -> float | None:
        if not self.cycle_momentum:
            return None
        phase, frac = self._phase(step)
        if phase == 0:
            return cos_anneal(self.max_momentum, self.base_momentum, frac)
        return cos_anneal(self.base_momentum, self.max_momentum, frac)


# ------------------------------------------------------- retraining after pruning (METHODS §2.4)
PRESETS = ("cifar", "imagenet")
ORIGINAL_MILESTONES = {"cifar": (0.5, 0.75), "imagenet": (1 / 3, 2 / 3)}
"""The original step schedule of a preset, as fractions of T: CIFAR ÷10 at 80 and 120 of 160
epochs, ImageNet ÷10 every 30 of 90 (METHODS §2.2); milestone = ⌊fraction · T⌋."""
SLR_MILESTONES = {"cifar": (0.45, 0.675), "imagenet": (0.297, 0.594)}
"""Scaled LR restarting milestones m₁ = ⌊f₁·t⌋, m₂ = ⌊f₂·t⌋, counted after the warm-up (§2.4.4)."""
RETRAINING_PLANS = ("finetune", "lr_rewind", "weight_rewind", "scaled_restart", "cyclic_restart")

EpochFunction = Callable[[float], float]
"""An original schedule given as a function: epoch (0 … T, fractional within an epoch) -> LR."""
OriginalSpec = Union[None, str, Mapping[str, Any], LRPlan, EpochFunction]


def _preset(preset: str) -> str:
    if preset not in PRESETS:
        raise UserError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return preset


def _check_budget(epochs: int, steps_per_epoch: int, total_steps: int) -> None:
    for field, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{field}: expected an integer >= 1, got {value!r}")
    if total_steps != epochs * steps_per_epoch:
        raise UserError(f"steps: a retraining plan runs whole epochs, {epochs} x {steps_per_epoch} = "
                        f"{epochs * steps_per_epoch} steps, not {total_steps}")


class OriginalSchedule:
    """The LR (and momentum) of the original training as functions of its epoch position.

    ``lr(x)`` for x in [0, T]: an integer x is the start of epoch x; a fractional x lies inside
    an epoch (used by per-iteration replay). Positions at or past T read the last step.
    """

    def __init__(self, epochs: int, lr: EpochFunction, momentum: Callable[[float], float | None] | None = None,
                 description: str = "") -> None:
        self.epochs = epochs
        self._lr, self._momentum = lr, momentum
        self.description = description

    def lr(self, epoch: float) -> float:
        return self._lr(epoch)

    def momentum(self, epoch: float) -> float | None:
        return self._momentum(epoch) if self._momentum is not None else None

    @classmethod
    def from_plan(cls, plan: LRPlan, epochs: int, description: str = "") -> OriginalSchedule:
        """Wrap a plan of the original run; its steps per epoch are ``plan.total_steps / epochs``."""
        if plan.total_steps % epochs:
            raise UserError(f"original: the plan has {plan.total_steps} steps, not a multiple of "
                            f"original_epochs={epochs}")
        per_epoch = plan.total_steps // epochs

        def step_at(epoch: float) -> int:
            # The epsilon keeps a replayed position such as (88 + s/N)·N from landing one step early.
            return min(max(0, math.floor(epoch * per_epoch + 1e-9)), plan.total_steps - 1)

        return cls(epochs, lambda e: plan.lr(step_at(e)), lambda e: plan.momentum(step_at(e)),
                   description or type(plan).__name__)


def preset_milestones(original_epochs: int, preset: str = "cifar") -> list[int]:
    """The original schedule's LR drops in epochs: ⌊f·T⌋ for the preset's fractions f."""
    return [math.floor(f * original_epochs + 1e-9) for f in ORIGINAL_MILESTONES[_preset(preset)]]


def original_schedule(original: OriginalSpec = None, *, original_epochs: int, steps_per_epoch: int = 1,
                      lr: float = 0.1, preset: str = "cifar", milestones: list[int] | None = None,
                      gamma: float = 0.1) -> OriginalSchedule:
    """The original training's schedule from any of these descriptions:

    * ``None`` or ``"step"``: LR ``lr`` multiplied by ``gamma`` at ``milestones`` (epochs), by
      default the preset's (CIFAR ⌊T/2⌋, ⌊3T/4⌋; ImageNet ⌊T/3⌋, ⌊2T/3⌋);
    * another registered plan name (``"cosine"``, ``"onecycle"``), or a mapping
      ``{"name": ..., **arguments}``, built over T epochs of ``steps_per_epoch`` steps with ``lr``;
    * an :class:`LRPlan` of the original run (T epochs; its steps per epoch are inferred);
    * a function epoch -> LR (momentum then stays as the optimizer has it).
    """
    if isinstance(original_epochs, bool) or not isinstance(original_epochs, int) or original_epochs < 1:
        raise UserError(f"original_epochs: expected an integer >= 1, got {original_epochs!r}")
    if isinstance(original, LRPlan):
        return OriginalSchedule.from_plan(original, original_epochs)
    if original is None or isinstance(original, (str, Mapping)):
        spec = {"name": original or "step"} if not isinstance(original, Mapping) else dict(original)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise UserError("original: a mapping needs a 'name' naming a registered LR plan")
        if name == "step":
            spec.setdefault("milestones", milestones if milestones is not None
                            else preset_milestones(original_epochs, preset))
            spec.setdefault("gamma", gamma)
        elif milestones is not None:
            raise UserError(f"original_milestones: only a step original takes milestones, not {name!r}")
        if name in RETRAINING_PLANS:
            raise UserError(f"original: {name!r} is a retraining plan, not an original schedule")
        base_lr = spec.pop("lr", lr)
        plan = build_lr_plan(name, lr=base_lr, epochs=original_epochs, steps_per_epoch=steps_per_epoch, **spec)
        details = "".join(f", {k} {v}" for k, v in spec.items() if not (k == "gamma" and v == 0.1))
        return OriginalSchedule.from_plan(plan, original_epochs, f"{name} from {base_lr:g}{details}")
    if callable(original):
        return OriginalSchedule(original_epochs, original, None, getattr(original, "__name__", "function"))
    raise UserError(f"original: expected a schedule name, mapping, LRPlan or function, got {type(original).__name__}")


class RetrainingPlan(LRPlan):
    """A retraining phase of ``epochs`` (t) epochs of ``steps_per_epoch`` steps (METHODS §2.4).

    ``epoch(step)`` is the retraining epoch e = 0 … t−1 of an optimizer step.
    """

    per_iteration = False
    """True when the LR changes inside an epoch (1-cycle); False when it is stepped per epoch."""

    def __init__(self, total_steps: int, epochs: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps)
        _check_budget(epochs, steps_per_epoch, total_steps)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch

    def epoch(self, step: int) -> int:
        return min(step // self.steps_per_epoch, self.epochs - 1)

    def describe(self) -> str:
        return type(self).__name__


@LR_PLANS.register("finetune")
class FineTune(RetrainingPlan):
    """FT: the original run's final LR held constant (METHODS §2.4.1: 0.001), no scheduler."""

    def __init__(self, total_steps: int, epochs: int, steps_per_epoch: int, lr: float = 0.001) -> None:
        super().__init__(total_steps, epochs, steps_per_epoch)
        self.constant = ConstantLR(total_steps, lr)

    def lr(self, step: int) -> float:
        return self.constant.lr(step)

    def describe(self) -> str:
        return f"finetune: constant {self.constant.base_lr:g}"


@LR_PLANS.register("lr_rewind")
class LRRewind(RetrainingPlan):
    """LRW: keep the final weights and replay the original schedule's last t epochs,
    η(e) = η_orig(T − t + e) (METHODS §2.4.3), stepped per epoch.

    The generic form needs no closed form per data set: for CIFAR (T = 160, drops at 80/120) it
    gives 0.1/0.01/0.001 phases ending t − 80 and t − 40 epochs in, for ImageNet (T = 90, drops
    every 30) t = 45 gives 15 epochs at 0.01 then 0.001, and t = 90 simply replays the whole run.
    ``per_iteration=True`` replays a continuous original (cosine, 1-cycle) step by step instead of
    at each epoch's start. The original's momentum is replayed too where it has one. ``lr`` is
    the original's base LR when it is built here (``original`` None, a name or a mapping).
    """

    def __init__(self, total_steps: int, epochs: int, steps_per_epoch: int, original_epochs: int,
                 lr: float = 0.1, preset: str = "cifar", original: OriginalSpec = None,
                 original_milestones: list[int] | None = None, gamma: float = 0.1,
                 per_iteration: bool = False) -> None:
        super().__init__(total_steps, epochs, steps_per_epoch)
        self.original = original_schedule(original, original_epochs=original_epochs, steps_per_epoch=steps_per_epoch,
                                          lr=lr, preset=preset, milestones=original_milestones, gamma=gamma)
        if epochs > original_epochs:
            raise UserError(f"epochs: a rewinding budget of t={epochs} epochs exceeds the original training's "
                            f"original_epochs={original_epochs}")
        self.original_epochs = original_epochs
        self.rewind_epoch = original_epochs - epochs
        """T − t: the original epoch the retraining starts from."""
        self.per_iteration = bool(per_iteration)

    def original_position(self, step: int) -> float:
        """Where in the original run (in epochs) the retraining step's LR is read."""
        if self.per_iteration:
            return self.rewind_epoch + min(step, self.total_steps - 1) / self.steps_per_epoch
        return self.rewind_epoch + self.epoch(step)

    def lr(self, step: int) -> float:
        return self.original.lr(self.original_position(step))

    def momentum(self, step: int) -> float | None:
        return self.original.momentum(self.original_position(step))

    def describe(self) -> str:
        return (f"{self._label()}: epochs {self.rewind_epoch}…{self.original_epochs - 1} of the original "
                f"T={self.original_epochs} ({self.original.description})")

    def _label(self) -> str:
        return "lr_rewind"


@LR_PLANS.register("weight_rewind")
class WeightRewind(LRRewind):
    """WR: the LR of :class:`LRRewind`; the surviving weights are first reset to those saved at
    original epoch ``rewind_epoch`` = T − t (see :mod:`prunekit.methods.retraining`)."""

    def _label(self) -> str:
        return f"weight_rewind (weights of epoch {self.rewind_epoch})"


@LR_PLANS.register("scaled_restart")
class ScaledRestart(RetrainingPlan):
    """SLR: the original step schedule compressed into t epochs, after a cosine warm-up
    (METHODS §2.4.4), stepped per epoch.

    W = ⌊0.1·t⌋ warm-up epochs: epoch e ≤ W uses cos_anneal(init_lr, lr, e/W) (epoch 0 at
    ``init_lr``, epoch W at ``lr``); then with k = e − W the LR is lr, lr·γ, lr·γ² from k = 0,
    m₁, m₂, where (m₁, m₂) = ⌊f·t⌋ for the preset's fractions (CIFAR 0.45/0.675, ImageNet
    0.297/0.594) or ``milestones`` given as fractions of t. With t < 10 (W = 0) there is no
    warm-up. ``init_lr`` defaults to lr/100 (0.001 for the paper's 0.1).
    """

    def __init__(self, total_steps: int, epochs: int, steps_per_epoch: int, lr: float = 0.1,
                 init_lr: float | None = None, preset: str = "cifar", milestones: tuple[float, float] | None = None,
                 warmup_fraction: float = 0.1, gamma: float = 0.1) -> None:
        super().__init__(total_steps, epochs, steps_per_epoch)
        fractions = SLR_MILESTONES[_preset(preset)] if milestones is None else tuple(milestones)
        if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions):
            raise UserError(f"milestones: expected fractions of the budget in (0, 1), got {list(fractions)!r}")
        if not 0 <= warmup_fraction < 1:
            raise UserError(f"warmup_fraction: expected a fraction in [0, 1), got {warmup_fraction!r}")
        self.peak, self.gamma = lr, gamma
        self.init_lr = lr / 100 if init_lr is None else init_lr
        self.warmup_epochs = math.floor(warmup_fraction * epochs + 1e-9)
        self.milestones = sorted(math.floor(f * epochs + 1e-9) for f in fractions)

    def epoch_lr(self, epoch: int) -> float:
        w = self.warmup_epochs
        if epoch < w:
            return cos_anneal(self.init_lr, self.peak, epoch / w)
        k = epoch - w
        return self.peak * self.gamma ** sum(k >= m for m in self.milestones)

    def lr(self, step: int) -> float:
        return self.epoch_lr(self.epoch(step))

    def describe(self) -> str:
        warmup = (f"warm-up {self.warmup_epochs} epoch{'s' if self.warmup_epochs > 1 else ''} "
                  f"{self.init_lr:g}→{self.peak:g}, then " if self.warmup_epochs else "no warm-up, ")
        return (f"scaled_restart: {warmup}{self.peak:g} ÷{1 / self.gamma:g} at "
                f"{' and '.join(str(m) for m in self.milestones)} epochs after it")


@LR_PLANS.register("cyclic_restart")
class CyclicRestart(RetrainingPlan):
    """CLR: :class:`OneCycleLR` with NPTM's defaults (METHODS §2.4.5), per iteration over t·N steps:
    peak 0.1 at 10 % of the steps, start 0.1/100 = 0.001, end 0.001/100 = 1e-5, momentum
    0.95 → 0.85 → 0.95 (cycling on; ``cycle_momentum=False`` is the paper's ablation)."""

    per_iteration = True

    def __init__(self, total_steps: int, epochs: int, steps_per_epoch: int, lr: float = 0.1,
                 pct_start: float = 0.1, div_factor: float = 100.0, final_div_factor: float = 100.0,
                 base_momentum: float = 0.85, max_momentum: float = 0.95, cycle_momentum: bool = True) -> None:
        super().__init__(total_steps, epochs, steps_per_epoch)
        self.cycle = OneCycleLR(total_steps, lr, pct_start=pct_start, div_factor=div_factor,
                                final_div_factor=final_div_factor, base_momentum=base_momentum,
                                max_momentum=max_momentum, cycle_momentum=cycle_momentum)

    def lr(self, step: int) -> float:
        return self.cycle.lr(step)

    def momentum(self, step: int) -> float | None:
        return self.cycle.momentum(step)

    def describe(self) -> str:
        c = self.cycle
        cycling = (f", momentum {c.max_momentum:g}→{c.base_momentum:g}→{c.max_momentum:g}"
                   if c.cycle_momentum else ", momentum fixed")
        return (f"cyclic_restart: {c.start:g}→{c.peak:g} (step {c.phase1_end:g} of {self.total_steps})→{c.end:g}, "
                f"per iteration{cycling}")


def epoch_table(plan: LRPlan, steps_per_epoch: int) -> list[dict[str, float | int]]:
    """One row per epoch: ``{"epoch": e, "lr": …}`` at the epoch's first step (e from 0), with
    ``"momentum"`` where the plan sets it."""
    rows: list[dict[str, float | int]] = []
    for epoch in range(plan.total_steps // steps_per_epoch):
        step = epoch * steps_per_epoch
        row: dict[str, float | int] = {"epoch": epoch, "lr": plan.lr(step)}
        momentum = plan.momentum(step)
        if momentum is not None:
            row["momentum"] = momentum
        rows.append(row)
    return rows


def build_lr_plan(name: str, *, lr: float | None = None, epochs: int, steps_per_epoch: int,
                  total_steps: int | None = None, original_epochs: int | None = None, preset: str | None = None,
                  original: OriginalSpec = None, **args: Any) -> LRPlan:
    """Build a registered plan; it receives the run's context (``lr``, ``epochs``,
    ``steps_per_epoch`` and, for retraining plans, ``original_epochs``, ``preset``, ``original``)
    where it takes them. Context left at None leaves the plan's own default (an error names a
    required one that is missing). The plan spans ``total_steps`` steps, by default
    ``epochs`` x ``steps_per_epoch`` (a step budget passes its own, ``epochs`` then covering it)."""
    factory = LR_PLANS.get(name)
    total = epochs * steps_per_epoch if total_steps is None else total_steps
    context = {"lr": lr, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
               "original_epochs": original_epochs, "preset": preset, "original": original}
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise UserError(f"lr_plan_args: {name!r} does not take {', '.join(unknown)}")
    wanted = {k: v for k, v in context.items() if k in accepted and v is not None}
    missing = [p for p in list(accepted)[1:]
               if accepted[p].default is inspect.Parameter.empty and p not in wanted and p not in args]
    if missing:
        raise UserError(f"{missing[0]}: the {name!r} LR plan needs it")
    return factory(total, **wanted, **args)
