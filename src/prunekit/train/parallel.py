"""The model as the ranks of a torchrun launch train it: DistributedDataParallel around the
Trainer's module, and SyncBatchNorm in place of BatchNorm while it trains (CUDA only)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from prunekit.distributed import DistContext
from prunekit.errors import UserError

log = logging.getLogger(__name__)


def check_sharded(loader: object, dist: DistContext) -> None:
    """A loader the Trainer uses must be this rank's shard (``rank``/``world_size`` of the launch)."""
    rank, size = getattr(loader, "rank", None), getattr(loader, "world_size", None)
    if size is not None and (size, rank) != (dist.world_size, dist.rank):
        raise UserError(f"a data loader is shard {rank} of {size}, but this is rank {dist.rank} of "
                        f"{dist.world_size}: build it with build_data(..., **prunekit.distributed.current().shard)")


def wrap(model: nn.Module, dist: DistContext, device: torch.device) -> nn.Module:
    """``model`` under DDP when the launch has several ranks (every rank starts from rank 0's
    weights and buffers), else ``model`` itself."""
    if not dist.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def to_sync_batchnorm(model: nn.Module, device: torch.device) -> dict[str, type[nn.Module]]:
    """Swap every BatchNorm of ``model`` for a SyncBatchNorm sharing its parameters and buffers;
    the original classes by module name, for :func:`from_sync_batchnorm`."""
    if device.type != "cuda":
        raise UserError("sync_batchnorm: PyTorch's SyncBatchNorm runs on CUDA only; on a CPU leave it off")
    originals: dict[str, type[nn.Module]] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                if child.affine:
                    sync.weight, sync.bias = child.weight, child.bias
                if child.track_running_stats:
                    sync.running_mean, sync.running_var = child.running_mean, child.running_var
                    sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(module, child_name, sync)
                originals[f"{name}.{child_name}" if name else child_name] = type(child)
    return originals


def from_sync_batchnorm(model: nn.Module, originals: dict[str, type[nn.Module]]) -> None:
    """Turn the SyncBatchNorm modules back into their original classes, sharing the current
    (trained, possibly compacted) parameters and statistics."""
    for qualified, kind in originals.items():
        parent_name, _, child_name = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        sync = getattr(parent, child_name)
        width = sync.weight.shape[0] if sync.affine else sync.running_mean.shape[0]  # compaction may have cut it
        plain = kind(width, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        for tensor_name, tensor in [*sync.named_parameters(recurse=False), *sync.named_buffers(recurse=False)]:
            setattr(plain, tensor_name, tensor)
        plain.train(sync.training)
        setattr(parent, child_name, plain)
