"""Vectorised augmentation of whole uint8 batches: random crop, horizontal flip, normalise.

Every function works on a batch ``N x C x H x W`` at once (no per-image Python loop, no PIL)
and returns tensors in ``torch.channels_last`` memory format, the layout the trainer runs in.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = Sequence[float] | Tensor


def sample_crop_flip(
    n: int, *, pad: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw per-image crop offsets ``dy, dx`` in ``[0, 2*pad]`` and a flip mask.

    Draw order is fixed (offsets, then flips) so a seeded generator gives the same batch.
    With ``pad == 0`` no offsets are drawn; with ``flip=False`` no flips are drawn.
    """
    if pad > 0:
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    else:
        dy = dx = torch.zeros(n, dtype=torch.long)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
    else:
        flipped = torch.zeros(n, dtype=torch.bool)
    return dy, dx, flipped


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flipped: Tensor, *, pad: int) -> Tensor:
    """Zero-pad by ``pad``, take the ``H x W`` window at ``(dy, dx)`` and mirror flipped images.

    One gather does crop and flip together: a flipped image reads its window's columns in
    reverse. Returns uint8 ``N x C x H x W`` in channels_last layout.
    """
    n, _, h, w = images.shape
    nhwc = images.permute(0, 2, 3, 1)
    if pad > 0:
        nhwc = F.pad(nhwc, (0, 0, pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    out = nhwc[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def normalize(images: Tensor, mean: Stats, std: Stats) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``(x / 255 - mean) / std`` per channel, channels_last."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = images.to(torch.float32, memory_format=torch.channels_last)
    return out.sub_(mean_t * 255.0).div_(std_t * 255.0)


def augment_batch(
    images: Tensor,
    mean: Stats,
    std: Stats,
    *,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random crop (zero padding ``pad``) + random horizontal flip + normalise a uint8 batch."""
    dy, dx, flipped = sample_crop_flip(images.shape[0], pad=pad, flip=flip, generator=generator)
    return normalize(crop_flip(images, dy, dx, flipped, pad=pad), mean, std)
