"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56/110 and the shared basic-block network.

Module order follows the conv numbering of METHODS.md §2.3.1: the stem conv is 1, then each
block's ``conv1``, ``conv2`` in order (option-B shortcut convs come after their block's
``conv2``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.groups import register_opaque

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: parameter-free spatial subsampling plus zero channel padding.

    Output channel ``offset + i`` carries input channel ``i``; the other channels are zero.
    The padding is split evenly around the input (``offset = (out - in) // 2``), as in the
    HRank/AutoBot CIFAR ResNets, so their checkpoints keep their meaning.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("PadShortcut cannot reduce channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.offset = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        back = self.out_channels - self.in_channels - self.offset
        return F.pad(x, (0, 0, 0, 0, self.offset, back))

    def extra_repr(self) -> str:
        sizes = f"{self.in_channels}, {self.out_channels}"
        return f"{sizes}, stride={self.stride}, offset={self.offset}"


register_opaque(PadShortcut, "coupled to an option-A zero-padding shortcut (PadShortcut), whose channel "
                "offset Torch-Pruning cannot follow")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, shortcut: Shortcut
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3x3 (stride 1) + stages ``layer1..layerN`` of basic blocks + avgpool + fc.

    Stage ``i`` has ``widths[i]`` channels and ``blocks[i]`` blocks; every stage but the
    first halves the resolution in its first block. The stem has ``widths[0]`` channels.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        shortcut: Shortcut,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int, shortcut: Shortcut = "A", num_classes: int = 10, in_channels: int = 3
) -> CifarResNet:
    """ResNet-``depth`` for CIFAR: 3 stages of 16/32/64 channels, (depth-2)/6 blocks each."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), shortcut, num_classes, in_channels)
