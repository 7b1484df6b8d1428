"""AutoBot's gate losses (METHODS §4.4): the MACs term pulled to a target and the 0/1 term.

The full loss is ``CE + β·flops_loss(F(λ), T, F_max) + γ·bool_loss(λ)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunekit.errors import UserError


def flops_loss(macs: torch.Tensor | float, target: float, dense: float) -> torch.Tensor:
    """``(F − T) / (F_max − T)`` above the target, ``1 − F / T`` at or below it.

    0 at ``F = T``, 1 at ``F = 0`` and at ``F = F_max``, linear on each side; differentiable
    in ``macs`` (a tensor keeps its graph).
    """
    if not 0 < target < dense:
        raise UserError(f"target: expected MACs strictly between 0 and the dense {dense:,.0f}, got {target:,.0f}")
    macs = torch.as_tensor(macs, dtype=torch.get_default_dtype()) if not torch.is_tensor(macs) else macs
    return torch.where(macs > target, (macs - target) / (dense - target), 1 - macs / target)


def bool_loss(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over gated layers of each layer's mean ``|λ − round(λ)|`` (the official code's averaging)."""
    if not gates:
        raise ValueError("bool_loss needs at least one gate vector")
    return torch.stack([(g - g.detach().round()).abs().mean() for g in gates]).mean()
