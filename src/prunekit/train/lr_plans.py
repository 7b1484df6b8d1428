"""Learning-rate plans: the LR (and momentum) at any optimizer step, as plain objects.

A plan is a pure function of the global step, so plots and tests can read it without
training and a resumed run needs only its step counter. The Trainer writes the values
into the optimizer before every step (per-iteration scheduling).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

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


LR_PLANS: Registry[Callable[..., LRPlan]] = Registry("LR schedule")


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
    """Multiply the LR by ``gamma`` at each milestone (in epochs, or fractions of the run if < 1)."""

    def __init__(self, total_steps: int, lr: float, steps_per_epoch: int, epochs: int,
                 milestones: list[float] = (0.5, 0.75), gamma: float = 0.1) -> None:
        super().__init__(total_steps)
        self.base_lr, self.gamma = lr, gamma
        epoch_milestones = [m * epochs if 0 < m < 1 else m for m in milestones]
        self.step_milestones = sorted(round(m * steps_per_epoch) for m in epoch_milestones)

    def lr(self, step: int) -> float:
        passed = sum(step >= m for m in self.step_milestones)
        return self.base_lr * self.gamma**passed


@LR_PLANS.register("cosine")
class CosineLR(LRPlan):
    """Optional linear warm-up, then cosine decay to ``min_lr`` at the last step."""

    def __init__(self, total_steps: int, lr: float, steps_per_epoch: int, epochs: int,
                 warmup_epochs: float = 0.0, min_lr: float = 0.0) -> None:
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


def build_lr_plan(name: str, *, lr: float, epochs: int, steps_per_epoch: int, **args: Any) -> LRPlan:
    """Build a registered plan; plans that need the run's length in epochs receive it."""
    factory = LR_PLANS.get(name)
    total = epochs * steps_per_epoch
    context = {"lr": lr, "epochs": epochs, "steps_per_epoch": steps_per_epoch}
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise UserError(f"schedule_args: {name!r} does not take {', '.join(unknown)}")
    wanted = {k: v for k, v in context.items() if k in accepted}
    return factory(total, **wanted, **args)
