"""Inference latency: warm-up, then the median of N timed forward passes."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.device import autocast


@dataclass(frozen=True)
class Latency:
    batch_size: int
    precision: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1000)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1,
                    precision: str = "fp32", channels_last: bool = True, warmup: int = 10,
                    repeats: int = 50, device: torch.device | None = None) -> Latency:
    """Median wall time of ``model(x)`` in eval mode for a random batch (training flag restored)."""
    device = device or next(model.parameters()).device
    memory_format = torch.channels_last if channels_last and len(input_shape) == 3 else torch.contiguous_format
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device).contiguous(memory_format=memory_format)
    times = []
    try:
        with autocast(device, precision):
            for i in range(warmup + repeats):
                _sync(device)
                began = time.perf_counter()
                model(x)
                _sync(device)
                if i >= warmup:
                    times.append((time.perf_counter() - began) * 1000)
    finally:
        model.train(was_training)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Latency(batch_size=batch_size, precision=precision, median_ms=statistics.median(times),
                   p10_ms=deciles[0], p90_ms=deciles[-1], repeats=repeats)


def latency_grid(model: nn.Module, input_shape: tuple[int, ...], *, batch_sizes: tuple[int, ...] = (1, 32),
                 precisions: tuple[str, ...] = ("fp32", "bf16"), **options) -> list[Latency]:
    """Latency at every (batch size, precision) pair; fp32 runs NCHW, bf16 channels_last."""
    return [measure_latency(model, input_shape, batch_size=b, precision=p, channels_last=p == "bf16", **options)
            for b in batch_sizes for p in precisions]
