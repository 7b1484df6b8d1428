"""Importance criteria: plain functions from a weight tensor to one score per pruning unit."""

from __future__ import annotations

import torch


def l1_filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """Sum of |w| over everything but the output-channel dimension (PFEC, Li et al. 2017)."""
    return weight.detach().abs().flatten(1).sum(dim=1)


def l2_filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter."""
    return weight.detach().flatten(1).norm(dim=1)
