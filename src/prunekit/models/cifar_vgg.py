"""HRank-style CIFAR VGG-16-BN (the network behind AutoBot's 314.29M-MAC baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class CifarVGG(nn.Module):
    """conv3x3(bias)-BN-ReLU stack with max-pools at ``"M"``, a functional 2x2 avg-pool, and
    ``Linear(c, c) -> BN1d -> ReLU -> Linear(c, classes)``.

    Module names follow HRank (``features.conv0``, ``features.norm0``, ``classifier.linear1``,
    ...) so HRank checkpoints load directly.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        channels = in_channels
        for i, x in enumerate(cfg):
            if x == "M":
                self.features.add_module(f"pool{i}", nn.MaxPool2d(2))
                continue
            self.features.add_module(f"conv{i}", nn.Conv2d(channels, int(x), 3, padding=1))
            self.features.add_module(f"norm{i}", nn.BatchNorm2d(int(x)))
            self.features.add_module(f"relu{i}", nn.ReLU())
            channels = int(x)
        self.classifier = nn.Sequential()
        self.classifier.add_module("linear1", nn.Linear(channels, channels))
        self.classifier.add_module("norm1", nn.BatchNorm1d(channels))
        self.classifier.add_module("relu1", nn.ReLU())
        self.classifier.add_module("linear2", nn.Linear(channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.features(x), 2)
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """HRank CIFAR VGG-16-BN: 314,294,272 MACs at 3x32x32 (thop convention)."""
    return CifarVGG(VGG16_CFG, num_classes, in_channels)
