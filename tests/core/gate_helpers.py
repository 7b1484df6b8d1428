"""Shared by the gate and scatter tests: seeded models far from their init, random 0/1 gates."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models import build_model

X = torch.zeros(1, 3, 32, 32)


def trained_like(name: str, seed: int = 0) -> nn.Module:
    """A seeded model in eval mode whose BN statistics and biases are far from their init."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def random_masks(values: dict[str, torch.Tensor], seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    """Random boolean masks shaped like ``values``, each keeping at least one channel."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for root, value in values.items():
        mask = torch.rand(value.shape, generator=g) < keep
        mask[torch.randint(value.numel(), (1,), generator=g)] = True
        out[root] = mask
    return out


def random_gates(values: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform gate values in [0, 1) shaped like ``values``."""
    g = torch.Generator().manual_seed(seed)
    return {root: torch.rand(value.shape, generator=g) for root, value in values.items()}


def probe(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
