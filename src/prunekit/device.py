"""Device and numeric-precision choices (never hard-code the device)."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

from prunekit.errors import UserError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; under torchrun (LOCAL_RANK set) a CUDA
    device without an index is this rank's GPU."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device: cuda was requested but no CUDA device is available")
    if device.type == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        world = os.environ.get("WORLD_SIZE", "1")
        if device.index is not None and world.isdigit() and int(world) > 1:
            raise UserError(f"device: {device} under torchrun would put every process on one GPU; give cuda "
                            "(each process takes the GPU of its LOCAL_RANK)")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast is a speed-up here (AVX-512/AMX CPUs, bf16-capable GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where it is fast, else ``fp32``."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise UserError(f"precision: expected auto, bf16 or fp32, got {precision!r}")
    return precision


def use_channels_last(requested: bool | None, device: torch.device, precision: str) -> bool:
    """``None`` means decide: channels_last pays with bf16 or on CUDA, and hurts fp32 on a CPU."""
    if requested is not None:
        return requested
    return device.type == "cuda" or precision == "bf16"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
