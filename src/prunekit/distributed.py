"""The process group of a ``torchrun`` launch and what the ranks share through it.

:func:`init_from_env` joins the group torchrun describes (gloo on CPU, NCCL on CUDA);
:func:`current` is this process's :class:`DistContext` (:data:`SINGLE` without a group). A
launch whose environment says ``WORLD_SIZE > 1`` without a process group is refused, never run
as independent replicas. File writes need nothing here: :mod:`prunekit.io` writes on rank 0 only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from prunekit.device import resolve_device
from prunekit.errors import UserError

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankMismatch(RuntimeError):
    """Ranks that must hold identical state (masks, gates, schedules) do not."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> dict[str, int]:
        """``rank`` and ``world_size`` for :func:`prunekit.data.build_data`."""
        return {"rank": self.rank, "world_size": self.world_size}

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (identity in a single process)."""
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) into every rank's ``module``."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in module.buffers():
                dist.broadcast(tensor, src=0)

    def check_identical(self, what: str, checksum: torch.Tensor) -> None:
        """Stop with :class:`RankMismatch` unless every rank passes the same ``checksum``."""
        if not self.distributed:
            return
        value = checksum.detach().double().flatten()
        both = torch.cat([value, -value])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if not torch.equal(both[: value.numel()], -both[value.numel():]):
            raise RankMismatch(f"{what} differ between the {self.world_size} ranks (rank {self.rank} holds "
                               f"checksum {value.tolist()}); they must be identical, so the run stops")

    def check_same(self, what: str, value: Any) -> None:
        """:meth:`check_identical` for a plain value, compared by a hash of its ``repr``."""
        if self.distributed:
            digest = int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:6], "big")
            self.check_identical(what, torch.tensor([float(digest)]))


SINGLE = DistContext()


def launch_world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise UserError(f"WORLD_SIZE: expected a positive integer, got {raw!r}")
    return size


def current() -> DistContext:
    """This process's place in the process group (:data:`SINGLE` without one).

    Raises :class:`UserError` when the environment says WORLD_SIZE > 1 but no process group
    was initialised (the ranks would train as independent replicas).
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    size = launch_world_size()
    if size > 1:
        raise UserError(f"WORLD_SIZE={size} is set but no process group is initialised; launch the prunekit "
                        "CLI with torchrun, or call prunekit.distributed.init_from_env() (or "
                        "torch.distributed.init_process_group) before training")
    return SINGLE


def init_from_env(device: torch.device | None = None) -> DistContext:
    """Join the process group a torchrun launch describes: gloo for CPU tensors, and NCCL for CUDA
    tensors where CUDA is present (so CPU training on a GPU host works too).

    A plain launch (WORLD_SIZE unset or 1) gives :data:`SINGLE`; an inconsistent one (WORLD_SIZE
    > 1 with RANK, LOCAL_RANK, MASTER_ADDR or MASTER_PORT missing or out of range) is a
    :class:`UserError`. Calling it again in the same process returns the joined group.
    """
    size = launch_world_size()
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                        "launch with torchrun (for example torchrun --nproc-per-node 2 -m prunekit ...)")
    rank, local_rank = os.environ["RANK"], os.environ["LOCAL_RANK"]
    if not (rank.isdigit() and int(rank) < size and local_rank.isdigit()):
        raise UserError(f"RANK={rank!r}, LOCAL_RANK={local_rank!r}: expected integers with 0 <= RANK < "
                        f"WORLD_SIZE={size}")
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(resolve_device(device))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current()


def shutdown() -> None:
    """Leave the process group (when this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
