"""Hyper-parameters of one training run, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prunekit.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Everything the Trainer needs to know besides the model, the data and the hooks.

    ``channels_last=None`` lets :func:`prunekit.device.use_channels_last` decide (on with bf16 or
    CUDA; off for fp32 on a CPU, where it was measured ~7x slower for ResNet-20 training).
    The LR plan is named by ``schedule`` and built by :mod:`prunekit.train.lr_plans`;
    ``schedule_args`` holds its extra arguments (for example ``milestones`` for ``step``).
    """

    epochs: int = 15
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "onecycle"
    schedule_args: dict[str, Any] = field(default_factory=dict)
    label_smoothing: float = 0.0
    precision: str = "auto"
    channels_last: bool | None = None
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        _require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        _require(_is_number(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        _require(_is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _require(
            _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing", "a number in [0, 1)", self.label_smoothing,
        )
        _require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        _require(isinstance(self.eval_every, int) and self.eval_every >= 1, "eval_every", "an integer >= 1", self.eval_every)
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise UserError(f"{name}: expected {expected}, got {got!r}")
