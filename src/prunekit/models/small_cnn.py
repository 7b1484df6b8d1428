"""A small plain-chain CNN for the 8x8 digits demo."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (32, 64 stride 2, 64 channels), global avg-pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32, 1),
            _conv_bn_relu(32, 64, 2),
            _conv_bn_relu(64, 64, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """The demo CNN; ``in_channels`` is 1 for the grayscale digits."""
    return SmallCNN(num_classes, in_channels)
