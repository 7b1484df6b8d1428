"""The one seam between the Trainer and multi-process training (torchrun / DDP).

Single-process runs use :data:`SINGLE`; everything rank-specific (who writes files, how a
metric is summed over ranks) goes through a :class:`DistContext`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and results."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (identity in a single process)."""
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


SINGLE = DistContext()


def context_from_env() -> DistContext:
    """Read RANK/WORLD_SIZE as set by torchrun; a plain launch gives :data:`SINGLE`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    return DistContext(rank=int(os.environ["RANK"]), world_size=world_size)
