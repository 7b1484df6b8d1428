"""Gradual pruning during training: One-Cycle Pruning and its baselines one-shot, iterative, AGP.

The recipe's ``prune`` section names a sparsity schedule (``prunekit.core.schedules``) and the
training it runs for. Before each training step the masks are updated to the schedule's
sparsity (every ``every`` steps, and always when the final sparsity is reached); after each
optimizer step they are enforced on weights, gradients and optimizer state. With the
scheduler's convention the model holds s(e/E) at the end of epoch e of E and exactly s_f at the
end (METHODS §3.2-§3.3).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator
from torch import nn

from prunekit.core.layers import filter_prunable_layers
from prunekit.core.schedules import SCHEDULES, Schedule, SparsityScheduler, build_schedule
from prunekit.core.sparsifier import Sparsifier
from prunekit.errors import UserError
from prunekit.methods.base import MethodContext, PruneResult, register_method
from prunekit.methods.common import TargetedMethod
from prunekit.schema import Fraction, PositiveInt, Section, TrainSpec, registered
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import EpochMetrics, Trainer

log = logging.getLogger(__name__)

_SCHEDULE_FIELD = re.compile(r"^(\w+): ")


class ScheduleSpec(Section):
    """A sparsity schedule (``SCHEDULES``): shape name, window, initial sparsity, shape parameters.

    The final sparsity is the ``prune.target`` fraction.
    """

    name: Annotated[str, registered(SCHEDULES)] = "one_cycle"
    initial: Fraction = 0.0
    start: Fraction = 0.0
    end: Fraction = 1.0
    params: dict[str, Any] = Field(default_factory=dict)


@register_method("gradual")
class Gradual(TargetedMethod):
    """Prune along a sparsity schedule while training for ``train``: masks are updated before
    steps and enforced after them (``monotone: false`` lets pruned weights come back, as fasterai)."""

    method: Literal["gradual"]
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    every: PositiveInt = 1
    monotone: bool = True
    train: TrainSpec

    @model_validator(mode="after")
    def _buildable(self) -> Gradual:
        clash = sorted(set(self.schedule.params) & {"name", "final", "initial", "start", "end"})
        if clash:
            where = "prune.target's fraction" if clash[0] == "final" else f"schedule.{clash[0]}"
            raise ValueError(f"schedule.params.{clash[0]}: is set by {where}, not a shape parameter")
        if self.parsed_target.unit == "macs":
            raise ValueError("target: macs=… needs method oneshot (a gradual schedule ramps weights=… or "
                             "filters=…)")
        try:
            built = self.sparsity_schedule()
        except UserError as exc:
            message = str(exc)
            match = _SCHEDULE_FIELD.match(message)
            key = match[1] if match else "name"
            key = {"schedule_args": "params", "schedule": "name"}.get(key, key)
            if key not in ScheduleSpec.model_fields:
                key = f"params.{key}"
            raise ValueError(f"schedule.{key}: {message[match.end():] if match else message}") from None
        self.schedule.params = dict(built.params)
        return self

    def phase(self) -> TrainSpec:
        return self.train

    def sparsity_schedule(self) -> Schedule:
        s = self.schedule
        return build_schedule(s.name, self.parsed_target.fraction, initial=s.initial, start=s.start, end=s.end,
                              **s.params)

    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        if self.structured:
            choice = {"layers": filter_prunable_layers(model, ctx.example_input()), "round_to": self.round_to,
                      "normalize": self.scope == "global"}
        else:
            choice = self.layer_choice()
        sparsifier = Sparsifier(model, self.granularity, self.criterion, self.scope, monotone=self.monotone,
                                seed=ctx.seed, **choice)
        if self.structured:
            sparsifier.couple_channels(model, ctx.example_input())
        hook = GradualPruning(sparsifier, self.sparsity_schedule(), every=self.every)
        trainer, result = ctx.fit(model, self.train, [hook])
        return PruneResult(trainer.model, masks=sparsifier.mask_set,
                           summary={"schedule": self.sparsity_schedule().describe()}, trainer=trainer,
                           training=result)


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
            trainer.check_identical("masks", self.sparsifier.mask_set.checksum())

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
