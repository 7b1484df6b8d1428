"""ResNet-18 for 32x32 inputs (3x3 stride-1 stem, no max-pool, 1x1-conv+BN downsampling)."""

from __future__ import annotations

from prunekit.models.cifar_resnet import CifarResNet


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """4 stages of 64/128/256/512 channels, 2 basic blocks each (11.17M params at 10 classes)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), "B", num_classes, in_channels)
