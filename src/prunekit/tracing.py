"""One probing forward pass with forward hooks, leaving the model exactly as it was."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def probe_forward(model: nn.Module, example_input: torch.Tensor, handles: Sequence[RemovableHandle]) -> None:
    """Run ``model(example_input)`` once in eval mode without gradients, then remove ``handles``
    and restore every module's training flag (even when the forward pass fails)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
