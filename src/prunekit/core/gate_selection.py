"""Which gate values AutoBot keeps (METHODS §4.5): those of the lowest-loss late step.

Fed each step's batch loss (computed before that step's update) and the gates it was computed
with, :class:`BestGates` keeps the gates of the step with the lowest loss among steps ``i > 0.6·n``
(step indices from 0, ``n`` steps in all), as the official code does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class BestGates:
    """The gates of the lowest-loss step with index ``> after · steps`` (``gates`` is None before one)."""

    def __init__(self, after: float = 0.6) -> None:
        self.after = after
        self.loss = float("inf")
        self.step: int | None = None
        self.gates: dict[str, torch.Tensor] | None = None

    def update(self, step: int, steps: int, loss: float | torch.Tensor, gates: Mapping[str, torch.Tensor]) -> bool:
        """Offer step ``step`` of ``steps`` with its batch loss and gate values; True when kept."""
        loss = float(loss)
        if not (step > self.after * steps and loss < self.loss):
            return False
        self.loss, self.step = loss, step
        self.gates = {root: value.detach().clone() for root, value in gates.items()}
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "step": self.step, "gates": self.gates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss, self.step, self.gates = float(state["loss"]), state["step"], state["gates"]
