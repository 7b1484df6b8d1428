"""The loader interface the trainer consumes, and its in-memory implementation.

Data order and augmentation of an epoch are a pure function of ``(seed, epoch)`` (and the
rank for augmentation), so resuming at an epoch boundary needs no saved RNG state.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor

from prunekit.data.augment import augment_batch, normalize
from prunekit.errors import UserError

_MASK64 = (1 << 64) - 1
MAX_BATCH_SIZE = 65_536
"""Largest batch a loader takes (per rank): beyond any real run, below a typo such as 10**9."""


class BatchLoader(Protocol):
    """Batches of ``(float NCHW normalised images, int64 labels)`` for one rank."""

    num_samples: int  # images per epoch seen by this rank

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...  # batches per epoch

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class DataBundle:
    """Train and test loaders of one data set plus what a model needs to know about it."""

    train: BatchLoader
    test: BatchLoader
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


@dataclass(frozen=True)
class LoaderOptions:
    """The options of ``build_data`` that every data set shares."""

    batch_size: int = 128
    test_batch_size: int = 512
    seed: int = 0
    augment: bool = True
    subset: int | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def test_subset(self) -> int | None:
        """Test images used with ``subset``: a fifth of it, at least one."""
        return None if self.subset is None else max(1, self.subset // 5)


def check_int(field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int in [``minimum``, ``maximum``], else raise a UserError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = f"in [{minimum}, {maximum:,}]" if maximum else f">= {minimum}"
        raise UserError(f"{field} must be an integer {bound}, got {value!r}")
    return value


def check_rank(rank: object, world_size: object) -> None:
    """Validate a ``(rank, world_size)`` pair."""
    size = check_int("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise UserError(f"rank must be an integer in [0, world_size={size}), got {rank!r}")


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (SplitMix64 finaliser per part)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed ops on one intra-op thread, restoring the caller's setting after.

    Batch transforms are too small to gain from more threads, and on shared or busy cores
    OpenMP barriers made them 5-10x slower than on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shard_indices(
    n: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    even: bool = True,
) -> Tensor:
    """This rank's sample indices for one epoch, like ``DistributedSampler``.

    All ranks draw the same permutation from ``seed * 1_000_003 + epoch``; rank ``r`` takes
    every ``world_size``-th index from ``r``. With ``even`` the permutation is first padded by
    repeating its head so every rank gets ``ceil(n / world_size)`` indices; without it each
    index appears exactly once across ranks (for evaluation).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    if even and world_size > 1:
        total = math.ceil(n / world_size) * world_size
        order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
    return order[rank::world_size]


class TensorLoader:
    """Batches from uint8 images held in memory, augmented as whole batches.

    Training: ``shuffle=True, augment=True`` (random crop with zero padding ``pad``, random
    horizontal flip if ``flip``). Evaluation: ``shuffle=False, augment=False`` (normalise only).
    The cached image tensor is shared, never modified.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        flip: bool = True,
        even_shards: bool = True,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"images must be a uint8 N x C x H x W tensor, got {images.dtype} "
                            f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise UserError(f"labels must have shape ({images.shape[0]},), "
                            f"got {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise UserError("images must hold at least one image, got 0")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise UserError(f"mean and std need {images.shape[1]} values (one per channel)")
        self.batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        self.seed = check_int("seed", seed, 0)
        self.pad = check_int("pad", pad, 0)
        check_rank(rank, world_size)
        self.images = images
        self.labels = labels.to(torch.int64)
        self.shuffle, self.augment, self.flip = shuffle, augment, flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.drop_last, self.even_shards = drop_last, even_shards
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0)

    def _indices(self) -> Tensor:
        return shard_indices(
            self.images.shape[0], shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
            rank=self.rank, world_size=self.world_size, even=self.even_shards,
        )

    def _rank_size(self) -> int:
        n, size = self.images.shape[0], self.world_size
        if self.even_shards:
            return math.ceil(n / size)
        return len(range(self.rank, n, size))

    def __len__(self) -> int:
        if self.drop_last:
            return self._rank_size() // self.batch_size
        return math.ceil(self._rank_size() / self.batch_size)

    @property
    def num_samples(self) -> int:
        return min(self._rank_size(), len(self) * self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self._indices()[: self.num_samples]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        for batch in indices.split(self.batch_size):
            with one_thread():
                images = self.images[batch]
                if self.augment:
                    out = augment_batch(images, self.mean, self.std, pad=self.pad,
                                        flip=self.flip, generator=generator)
                else:
                    out = normalize(images, self.mean, self.std)
            yield out, self.labels[batch]


def tensor_bundle(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    opts: LoaderOptions,
    pad: int,
    flip: bool,
) -> DataBundle:
    """A DataBundle of two TensorLoaders: shuffled, augmented train; ordered, plain test.

    ``opts.subset`` keeps the first N training and first N // 5 test images. The test loader
    shards without padding, so across ranks every test image is evaluated exactly once.
    """
    train_x, train_y = (t[: opts.subset] for t in train)
    test_x, test_y = (t[: opts.test_subset] for t in test)
    shared = dict(mean=mean, std=std, seed=opts.seed, rank=opts.rank, world_size=opts.world_size)
    return DataBundle(
        train=TensorLoader(train_x, train_y, batch_size=opts.batch_size, shuffle=True,
                           augment=opts.augment, pad=pad, flip=flip, **shared),
        test=TensorLoader(test_x, test_y, batch_size=opts.test_batch_size, shuffle=False,
                          augment=False, even_shards=False, **shared),
        num_classes=num_classes,
        input_shape=tuple(train_x.shape[1:]),
        name=name,
    )
