"""Test-set loss and top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from prunekit.device import autocast
from prunekit.distributed import SINGLE, DistContext, current


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             device: torch.device, precision: str = "fp32", channels_last: bool = False,
             dist: DistContext | None = None) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of ``model`` in eval mode (training flag restored).

    Batches from one rank's shard (a loader with ``world_size`` > 1) are summed over the ranks
    of ``dist`` (default: the current process group), so every rank gets the whole set's figures.
    """
    if dist is None:
        dist = current() if getattr(batches, "world_size", 1) > 1 else SINGLE
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += labels.numel()
    finally:
        model.train(was_training)
    loss_sum, correct, count = dist.sum(totals).tolist()
    count = max(count, 1)
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, samples=int(count))
