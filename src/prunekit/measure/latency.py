"""Inference latency: warm-up, then the median of N timed forward passes; and two models
compared in interleaved rounds (``torch.utils.benchmark``), so that a busy machine slows both alike."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


@dataclass(frozen=True)
class LatencyComparison:
    """Model A against model B, timed in alternating rounds; ``ratios`` = A / B per round."""

    before: Latency
    after: Latency
    ratios: tuple[float, ...]

    @property
    def speedup(self) -> float:
        """Median over rounds of (A time / B time): above 1, B is faster."""
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)

    @property
    def conclusive(self) -> bool:
        """Every round agrees on which model is faster (else the ratio is within the noise)."""
        return all(r > 1 for r in self.ratios) or all(r < 1 for r in self.ratios)

    def describe(self) -> str:
        low, high = self.spread
        text = f"{self.speedup:.2f}x (rounds {low:.2f}-{high:.2f}x, {len(self.ratios)} rounds)"
        return text if self.conclusive else text + "; inconclusive: the rounds disagree on which is faster"


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _import_benchmark():
    """``torch.utils.benchmark``, without the warning its C++-extension import logs on a machine without CUDA."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        quiet.setLevel(level)
    return benchmark


@torch.inference_mode()
def compare_latency(before: nn.Module, after: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1,
                    precision: str = "fp32", channels_last: bool = True, rounds: int = 7, repeats: int = 10,
                    warmup: int = 5, device: torch.device | None = None) -> LatencyComparison:
    """Time ``before`` and ``after`` in ``rounds`` alternating rounds of ``repeats`` calls each
    (``torch.utils.benchmark.Timer``, which syncs CUDA); per model the median over rounds and
    its 10th/90th percentiles, and the per-round ratios."""
    benchmark = _import_benchmark()
    device = device or next(after.parameters()).device
    memory_format = torch.channels_last if channels_last and len(input_shape) == 3 else torch.contiguous_format
    x = torch.randn(batch_size, *input_shape, device=device).contiguous(memory_format=memory_format)
    times: dict[int, list[float]] = {0: [], 1: []}
    with _eval(before), _eval(after), autocast(device, precision):
        for model in (before, after):
            for _ in range(warmup):
                model(x)
        timers = [benchmark.Timer("model(x)", globals={"model": m, "x": x}, num_threads=torch.get_num_threads())
                  for m in (before, after)]
        for _ in range(rounds):
            for i, timer in enumerate(timers):
                times[i].append(timer.timeit(repeats).median * 1000)
    summaries = []
    for i in (0, 1):
        deciles = statistics.quantiles(times[i], n=10) if rounds > 1 else [times[i][0]] * 9
        summaries.append(Latency(batch_size=batch_size, precision=precision, median_ms=statistics.median(times[i]),
                                 p10_ms=deciles[0], p90_ms=deciles[-1], repeats=rounds * repeats))
    return LatencyComparison(summaries[0], summaries[1], tuple(a / b for a, b in zip(times[0], times[1])))


def latency_grid(model: nn.Module, input_shape: tuple[int, ...], *, batch_sizes: tuple[int, ...] = (1, 32),
                 precisions: tuple[str, ...] = ("fp32", "bf16"), **options) -> list[Latency]:
    """Latency at every (batch size, precision) pair; fp32 runs NCHW, bf16 channels_last."""
    return [measure_latency(model, input_shape, batch_size=b, precision=p, channels_last=p == "bf16", **options)
            for b in batch_sizes for p in precisions]
