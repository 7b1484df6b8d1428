"""Image files in class folders (``root/train/<class>/*``, ``root/val/<class>/*``), ImageNet style.

Decoding and transforms run in a torch ``DataLoader``; the result is exposed as a
``BatchLoader``. Each sample's random transform is seeded from ``(seed, epoch, index)``,
so an epoch is reproducible whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets, transforms

from prunekit.data.cifar import resolve_data_dir
from prunekit.data.loader import (DataBundle, LoaderOptions, check_int, check_rank, derive_seed,
                                  shard_indices)
from prunekit.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int) -> Callable:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int) -> Callable:
    """Resize to ``image_size * 8 / 7`` (256 for 224), then centre-crop ``image_size``."""
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _SeededSamples(Dataset):
    """``dataset[(index, seed)]``: sample ``index`` drawn with the global RNG seeded by ``seed``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class _EpochSampler(Sampler):
    """Yields ``(index, seed)`` keys for the owner's current epoch."""

    def __init__(self, owner: "FolderLoader") -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[tuple[int, int]]:
        owner = self.owner
        base = derive_seed(owner.seed, owner.epoch)
        indices = owner.indices()[: owner.num_samples].tolist()
        return iter([(i, (base + i) & 0x7FFF_FFFF_FFFF_FFFF) for i in indices])

    def __len__(self) -> int:
        return self.owner.num_samples


class FolderLoader:
    """A ``BatchLoader`` over a map-style image dataset, decoded by DataLoader workers."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int | None = None,
        even_shards: bool = True,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        check_rank(rank, world_size)
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        check_int("num_workers", workers, 0)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.even_shards = even_shards
        self.epoch = 0
        self._loader = DataLoader(
            _SeededSamples(dataset), batch_size=batch_size, sampler=_EpochSampler(self),
            num_workers=workers, persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    def indices(self) -> Tensor:
        return shard_indices(self.size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size, even=self.even_shards)

    @property
    def num_samples(self) -> int:
        if self.even_shards:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self._loader:
            yield images.contiguous(memory_format=torch.channels_last), labels


def _image_folder(path: Path, transform: Callable) -> datasets.ImageFolder:
    if not path.is_dir():
        raise UserError(f"image folder '{path}' does not exist; --data-dir must contain "
                        f"train/ and val/ with one sub-folder per class")
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as err:
        reason = str(err).splitlines()[0]
        raise UserError(f"image folder '{path}' has no usable class folders: {reason}") from err


def build_imagefolder(
    opts: LoaderOptions,
    data_dir: str | None,
    download: bool,
    *,
    image_size: int = 224,
    num_workers: int | None = None,
) -> DataBundle:
    """Loaders for ``data_dir/train`` and ``data_dir/val`` (nothing is ever downloaded)."""
    check_int("image_size", image_size, 1)
    root = resolve_data_dir(data_dir)
    train_tf = train_transform(image_size) if opts.augment else eval_transform(image_size)
    train_set = _image_folder(root / "train", train_tf)
    val_set = _image_folder(root / "val", eval_transform(image_size))
    if val_set.classes != train_set.classes:
        raise UserError(f"image folder '{root}': val/ classes differ from train/ classes")
    log.info("image folder %s: %d train, %d val images, %d classes",
             root, len(train_set), len(val_set), len(train_set.classes))
    train: Dataset = train_set
    val: Dataset = val_set
    if opts.subset is not None:
        train = Subset(train_set, range(min(opts.subset, len(train_set))))
        val = Subset(val_set, range(min(opts.test_subset, len(val_set))))
    shared = dict(seed=opts.seed, rank=opts.rank, world_size=opts.world_size,
                  num_workers=num_workers)
    return DataBundle(
        train=FolderLoader(train, batch_size=opts.batch_size, shuffle=True, **shared),
        test=FolderLoader(val, batch_size=opts.test_batch_size, shuffle=False,
                          even_shards=False, **shared),
        num_classes=len(train_set.classes),
        input_shape=(3, image_size, image_size),
        name="imagefolder",
    )
