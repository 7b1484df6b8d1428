"""Building blocks of the recipe schema: strict sections, checked number types, training specs.

Every section forbids unknown keys and is strict about types (YAML ``"5"`` is not an integer),
so a typo or a wrong type is reported instead of silently ignored. Range checks give messages
in the project's style (``expected an integer >= 1, got -3``); the recipe loader adds the key
path in front.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from prunekit.errors import UserError
from prunekit.registry import Registry
from prunekit.data.loader import MAX_BATCH_SIZE
from prunekit.train.config import MAX_EPOCHS, MAX_STEPS, TrainConfig
from prunekit.train.lr_plans import LR_PLANS, build_lr_plan


class Section(BaseModel):
    """A recipe section: unknown keys and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


def _check(ok: Callable[[Any], bool], expected: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"expected {expected}, got {value!r}")
        return value

    return AfterValidator(validate)


def registered(registry: Registry) -> AfterValidator:
    """A name of an entry of ``registry``; an unknown one lists the known ones."""
    def validate(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
        return name

    return AfterValidator(validate)


def _finite(value: float) -> bool:
    return math.isfinite(value)


PositiveInt = Annotated[int, _check(lambda v: v >= 1, "an integer >= 1")]
Epochs = Annotated[int, _check(lambda v: 1 <= v <= MAX_EPOCHS, f"an integer in [1, {MAX_EPOCHS:,}]")]
Steps = Annotated[int, _check(lambda v: 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS:,}]")]
BatchSize = Annotated[int, _check(lambda v: 1 <= v <= MAX_BATCH_SIZE, f"an integer in [1, {MAX_BATCH_SIZE:,}]")]
NonNegativeInt = Annotated[int, _check(lambda v: v >= 0, "an integer >= 0")]
PositiveFloat = Annotated[float, _check(lambda v: _finite(v) and v > 0, "a number > 0")]
NonNegativeFloat = Annotated[float, _check(lambda v: _finite(v) and v >= 0, "a number >= 0")]
HalfOpenFraction = Annotated[float, _check(lambda v: 0 <= v < 1, "a number in [0, 1)")]
Fraction = Annotated[float, _check(lambda v: 0 <= v <= 1, "a fraction in [0, 1]")]

_TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("lr_plan_args", "betas")}


def reword(message: str, field: str) -> str:
    """Drop a leading ``field:`` from a library message (the loader prints the full key path)."""
    prefix = f"{field}: "
    return message[len(prefix):] if message.startswith(prefix) else message


class TrainSpec(Section):
    """One training phase: the fields of :class:`~prunekit.train.config.TrainConfig`.

    The LR plan is called ``lr_plan`` (+ ``lr_plan_args``) here, so it is never confused with a
    sparsity schedule; the seed comes from the recipe's ``seeds``.
    """

    epochs: Epochs = _TRAIN_DEFAULTS["epochs"]
    steps: Steps | None = None
    optimizer: Literal["sgd", "adamw", "adam"] = _TRAIN_DEFAULTS["optimizer"]
    lr: PositiveFloat = _TRAIN_DEFAULTS["lr"]
    lr_plan: Annotated[str, registered(LR_PLANS)] = _TRAIN_DEFAULTS["lr_plan"]
    lr_plan_args: dict[str, Any] = Field(default_factory=dict)
    momentum: HalfOpenFraction = _TRAIN_DEFAULTS["momentum"]
    nesterov: bool = _TRAIN_DEFAULTS["nesterov"]
    weight_decay: NonNegativeFloat = _TRAIN_DEFAULTS["weight_decay"]
    decay_norm_and_bias: bool = _TRAIN_DEFAULTS["decay_norm_and_bias"]
    betas: Annotated[list[HalfOpenFraction], _check(lambda v: len(v) == 2, "two numbers [beta1, beta2]")] = \
        Field(default_factory=lambda: list(TrainConfig().betas))
    eps: PositiveFloat = _TRAIN_DEFAULTS["eps"]
    label_smoothing: HalfOpenFraction = _TRAIN_DEFAULTS["label_smoothing"]
    precision: Literal["auto", "bf16", "fp32"] = _TRAIN_DEFAULTS["precision"]
    channels_last: bool | None = _TRAIN_DEFAULTS["channels_last"]
    eval_every: PositiveInt = _TRAIN_DEFAULTS["eval_every"]

    @model_validator(mode="after")
    def _plan_args(self) -> TrainSpec:
        import inspect

        given = {"total_steps", "lr", "epochs", "steps_per_epoch", *self.lr_plan_args}
        needed = [name for name, p in inspect.signature(LR_PLANS.get(self.lr_plan)).parameters.items()
                  if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD and name not in given]
        if needed:
            raise ValueError(f"lr_plan_args: {self.lr_plan!r} needs {', '.join(needed)}")
        try:  # a dry build checks the arguments against the plan's signature and its own checks
            build_lr_plan(self.lr_plan, lr=self.lr, epochs=self.epochs, steps_per_epoch=10, **self.lr_plan_args)
        except UserError as exc:
            raise ValueError(f"lr_plan_args: {reword(str(exc), 'lr_plan_args')}") from None
        except TypeError as exc:
            raise ValueError(f"lr_plan_args: {exc}") from None
        return self

    def config(self, seed: int) -> TrainConfig:
        """The TrainConfig of this phase for one seed."""
        return TrainConfig(epochs=self.epochs, steps=self.steps, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                           nesterov=self.nesterov, weight_decay=self.weight_decay,
                           decay_norm_and_bias=self.decay_norm_and_bias, betas=tuple(self.betas), eps=self.eps,
                           lr_plan=self.lr_plan, lr_plan_args=dict(self.lr_plan_args),
                           label_smoothing=self.label_smoothing, precision=self.precision,
                           channels_last=self.channels_last, seed=seed, eval_every=self.eval_every)
