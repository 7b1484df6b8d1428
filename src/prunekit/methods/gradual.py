"""Gradual pruning during training (One-Cycle Pruning and its baselines one-shot, iterative, AGP).

Before each training step the masks are updated to the schedule's sparsity (every ``every``
steps, and always when the final sparsity is reached); after each optimizer step they are
enforced on weights, gradients and optimizer state. With the scheduler's convention the model
holds s(e/E) at the end of epoch e of E and exactly s_f at the end (METHODS §3.2-§3.3).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prunekit.core.schedules import Schedule, SparsityScheduler
from prunekit.core.sparsifier import Sparsifier
from prunekit.errors import UserError
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import EpochMetrics, Trainer

log = logging.getLogger(__name__)


class GradualPruning(Hook):
    """Drive ``sparsifier`` along ``schedule`` over the Trainer's whole budget."""

    def __init__(self, sparsifier: Sparsifier, schedule: Schedule, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"every: expected an integer >= 1 (steps between mask updates), got {every!r}")
        self.sparsifier, self.schedule, self.every = sparsifier, schedule, every
        self.scheduler: SparsityScheduler | None = None
        self.applied = 0.0  # the sparsity the masks were last updated to
        self._pending: dict[str, Any] | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.scheduler = SparsityScheduler(self.schedule, trainer.total_steps)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None

    def on_step_begin(self, trainer: Trainer) -> None:
        target = self.scheduler.step()
        due = self.scheduler.last_step % self.every == 0 or target == self.schedule.final
        if due and target != self.applied:
            self.sparsifier.update(target, optimizer=trainer.optimizer)
            self.applied = target

    def after_optimizer_step(self, trainer: Trainer) -> None:
        self.sparsifier.enforce(trainer.optimizer)

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        metrics.extra["sparsity_target"] = self.applied
        metrics.extra["sparsity_realised"] = self.sparsifier.realised_sparsity().total

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else self._pending,
                "sparsifier": self.sparsifier.state_dict(), "applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.applied = state["applied"]
        self._pending = state["scheduler"]
