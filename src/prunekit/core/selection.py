"""Turning scores into the exact set of units to keep (METHODS §0.4: top-k, ties by index)."""

from __future__ import annotations

import torch

from prunekit.errors import UserError


def keep_count(total: int, fraction_removed: float) -> int:
    """Units kept when removing ``fraction_removed`` of ``total``: round((1 - s) * n)."""
    if not 0 <= fraction_removed <= 1:
        raise UserError(f"sparsity: expected a fraction in [0, 1], got {fraction_removed!r}")
    return round((1 - fraction_removed) * total)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties broken by lower index, returned sorted."""
    order = torch.sort(-scores.detach().flatten(), stable=True).indices
    return order[:k].sort().values
