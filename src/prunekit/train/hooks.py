"""Trainer hook points. A pruning method is a small set of hooks, never a fork of the loop.

Order of a run::

    on_train_begin -> (on_epoch_begin -> steps -> [on_evaluate] -> on_epoch_end) per epoch -> on_train_end

Order inside one training step::

    on_step_begin -> forward -> loss (+ every hook's extra_loss) -> backward
    -> before_optimizer_step -> optimizer.step() -> after_optimizer_step -> on_step_end(loss)

During every hook point of a step ``trainer.global_step`` is that step's 0-based index; it is
incremented after ``on_step_end``. ``on_step_end`` receives the step's loss (the one that was
back-propagated, extra terms included, computed with the weights from before the update) as a
detached scalar tensor on the training device: reading it (``.item()``) syncs the device, so
hooks that do so only when they need it keep the loop asynchronous.

Hooks with state worth resuming implement ``state_dict``/``load_state_dict``; the Trainer
stores it in every checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from prunekit.train.trainer import EpochMetrics, Trainer


class Hook:
    """Base class with no-op hook points; override the ones you need."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None: ...

    def on_step_begin(self, trainer: Trainer) -> None: ...

    def extra_loss(self, trainer: Trainer, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """A term added to the loss of this step (a penalty, a MACs loss), or None."""
        return None

    def before_optimizer_step(self, trainer: Trainer) -> None: ...

    def after_optimizer_step(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: EpochMetrics) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
