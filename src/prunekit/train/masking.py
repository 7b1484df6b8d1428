"""Trainer hooks that drive masks: enforce them after every step, gather movement evidence.

Core owns the masks (:mod:`prunekit.core.masks`); these hooks only call them at the right
points of the Trainer's step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.core.masks import MaskSet
from prunekit.core.sparsifier import Sparsifier
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import Trainer


class EnforceMasks(Hook):
    """Enforce the masks (weights, gradients, optimizer state) after every optimizer step; the
    masks travel in the Trainer's checkpoints."""

    def __init__(self, masks: MaskSet | Sparsifier) -> None:
        self.masks = masks

    def on_train_begin(self, trainer: Trainer) -> None:
        mask_set = self.masks.mask_set if isinstance(self.masks, Sparsifier) else self.masks
        trainer.check_identical("masks", mask_set.checksum())

    def after_optimizer_step(self, trainer: Trainer) -> None:
        self.masks.enforce(trainer.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state)


class MovementScores(Hook):
    """Accumulates movement scores −w·∂L/∂w before every optimizer step (Sanh et al. 2020).

    The learning-rate factor of the paper's definition is left out: it scales every score alike.
    Pass ``hook.evidence`` to ``Sparsifier.update``.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self.scores: dict[str, torch.Tensor] = {}

    def accumulate(self) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                grad = layer.weight.grad
                if grad is None:
                    continue
                if name not in self.scores:
                    self.scores[name] = torch.zeros_like(layer.weight, dtype=torch.float32)
                self.scores[name].addcmul_(layer.weight, grad, value=-1)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        self.accumulate()

    @property
    def evidence(self) -> dict[str, torch.Tensor]:
        return dict(self.scores)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": {name: s.cpu() for name, s in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {name: s.to(self.layers[name].weight.device) for name, s in state["scores"].items()}
