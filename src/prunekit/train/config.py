"""Hyper-parameters of one training run, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prunekit.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCALING = ("none", "linear")
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
"""Upper bounds of a training budget: far above any real run, low enough to catch a typo (10**12)."""


@dataclass
class TrainConfig:
    """Everything the Trainer needs to know besides the model, the data and the hooks.

    ``channels_last=None`` lets :func:`prunekit.device.use_channels_last` decide (on with bf16 or
    CUDA; off for fp32 on a CPU, where it was measured ~7x slower for ResNet-20 training).
    The LR plan is named by ``lr_plan`` and built by :mod:`prunekit.train.lr_plans`;
    ``lr_plan_args`` holds its extra arguments (for example ``milestones`` for ``step``).

    The budget is ``epochs`` passes over the training data, or, when ``steps`` is set, exactly
    ``steps`` optimizer steps (``epochs`` is then unused): the run lasts ceil(steps / N) epochs of
    N batches, the last one cut short where the budget ends.

    ``trainable`` (glob patterns of parameter names, :func:`fnmatch.fnmatchcase`) restricts
    training to the matching parameters: only they reach the optimizer, and the others have
    ``requires_grad=False`` while :meth:`Trainer.fit` runs. ``eval_mode`` keeps the model in
    ``eval()`` during training steps: BatchNorm uses and keeps its running statistics, dropout is off.

    ``optimizer``: ``sgd`` (with ``momentum``, ``nesterov``), ``adam`` (``torch.optim.Adam``;
    ``weight_decay`` is its coupled L2 term, so 0 gives plain Adam) or ``adamw`` (decoupled decay);
    both Adams take ``betas`` and ``eps``.

    Under torchrun (see :mod:`prunekit.distributed`) every rank takes batches of the loader's
    batch size, so the global batch is that times the world size; ``scale_lr="linear"``
    multiplies ``lr`` (the plan's peak) by the world size, ``"none"`` keeps it.
    ``sync_batchnorm`` turns BatchNorm layers into SyncBatchNorm for the length of
    :meth:`Trainer.fit` (CUDA only: PyTorch has no CPU SyncBatchNorm).
    """

    epochs: int = 15
    steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_plan: str = "onecycle"
    lr_plan_args: dict[str, Any] = field(default_factory=dict)
    trainable: tuple[str, ...] | None = None
    eval_mode: bool = False
    label_smoothing: float = 0.0
    precision: str = "auto"
    channels_last: bool | None = None
    seed: int = 0
    eval_every: int = 1
    scale_lr: str = "none"
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS, "epochs",
                 f"an integer in [1, {MAX_EPOCHS:,}]", self.epochs)
        _require(self.steps is None or (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS), "steps",
                 f"an integer in [1, {MAX_STEPS:,}] or None", self.steps)
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        _require(_is_number(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        _require(_is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        _require(
            _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing", "a number in [0, 1)", self.label_smoothing,
        )
        _require(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        _require(_is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "an integer >= 1", self.eval_every)
        _require(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _require(isinstance(self.eval_mode, bool), "eval_mode", "true or false", self.eval_mode)
        _require(self.scale_lr in LR_SCALING, "scale_lr", f"one of {', '.join(LR_SCALING)}", self.scale_lr)
        _require(isinstance(self.sync_batchnorm, bool), "sync_batchnorm", "true or false", self.sync_batchnorm)
        if self.trainable is not None:
            _require(isinstance(self.trainable, (list, tuple)) and len(self.trainable) > 0
                     and all(isinstance(p, str) and p for p in self.trainable),
                     "trainable", "a non-empty list of parameter-name patterns or None", self.trainable)
            self.trainable = tuple(self.trainable)
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise UserError(f"{name}: expected {expected}, got {got!r}")
