"""Data sets as train/test ``BatchLoader`` pairs: ``build_data(name, ...) -> DataBundle``.

Registered names: ``cifar10``, ``cifar100``, ``digits`` (bundled, no download) and
``imagefolder`` (``data_dir`` holds ``train/`` and ``val/``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

from prunekit.data.cifar import CIFAR10, CIFAR100, build_cifar, resolve_data_dir
from prunekit.data.digits import build_digits
from prunekit.data.imagefolder import build_imagefolder
from prunekit.data.loader import (MAX_BATCH_SIZE, BatchLoader, DataBundle, LoaderOptions, TensorLoader, check_int,
                                  check_rank)
from prunekit.distributed import current
from prunekit.errors import UserError
from prunekit.registry import Registry

__all__ = ["DATASETS", "BatchLoader", "DataBundle", "TensorLoader", "build_data",
           "resolve_data_dir"]

# A builder is called as builder(opts, data_dir, download, **options).
DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")
DATASETS.register("cifar10")(functools.partial(build_cifar, CIFAR10, "cifar10"))
DATASETS.register("cifar100")(functools.partial(build_cifar, CIFAR100, "cifar100"))
DATASETS.register("digits")(build_digits)
DATASETS.register("imagefolder")(build_imagefolder)

_COMMON = {"opts", "data_dir", "download"}
log = logging.getLogger(__name__)


def build_data(
    name: str,
    *,
    data_dir: str | None = None,
    batch_size: int = 128,
    test_batch_size: int = 512,
    seed: int = 0,
    augment: bool = True,
    subset: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    download: bool = True,
    **options: Any,
) -> DataBundle:
    """Train and test loaders of data set ``name`` for this rank.

    ``subset=N`` keeps the first N training and first N // 5 (at least one) test images.
    ``options`` go to the data set's builder (``imagefolder``: ``image_size``, ``num_workers``).
    ``rank``/``world_size`` default to the current torchrun process group
    (:func:`prunekit.distributed.current`; one rank without one): each rank gets its shard.
    """
    if rank is None or world_size is None:
        shard = current().shard
        rank = shard["rank"] if rank is None else rank
        world_size = shard["world_size"] if world_size is None else world_size
    builder = DATASETS.get(name)
    check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    check_int("test_batch_size", test_batch_size, 1, MAX_BATCH_SIZE)
    check_int("seed", seed, 0)
    if subset is not None:
        check_int("subset", subset, 1)
    check_rank(rank, world_size)
    accepted = set(inspect.signature(builder).parameters) - _COMMON
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                        f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
    opts = LoaderOptions(batch_size=batch_size, test_batch_size=test_batch_size, seed=seed,
                         augment=augment, subset=subset, rank=rank, world_size=world_size)
    ranks = current()
    if download and ranks.distributed and not ranks.is_main:
        ranks.barrier()  # rank 0 downloads first; the others read what it wrote
    bundle = builder(opts, data_dir, download, **options)
    if download and ranks.distributed and ranks.is_main:
        ranks.barrier()
    if batch_size > bundle.train.num_samples:
        log.warning("batch_size %d exceeds the %d training images of this rank: every epoch is one batch of %d",
                    batch_size, bundle.train.num_samples, bundle.train.num_samples)
    return bundle
