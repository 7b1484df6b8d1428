"""What compaction bought, per layer and in total, with hints where speed lags the MACs saved.

Returns data only; the CLI renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import nn

from prunekit.errors import UserError
from prunekit.measure.latency import Latency, LatencyComparison, compare_latency
from prunekit.measure.macs import count_macs
from prunekit.measure.params import count_params

SHORTFALL = 0.8
"""A speed-up below this fraction of the MACs ratio gets an explanation."""
NOTABLE = 0.05
"""Share of the remaining MACs from which dense or depthwise layers get a hint."""


@dataclass(frozen=True)
class LayerRow:
    """One layer with a weight: its shape and MACs (batch 1) before and after compaction."""

    name: str
    type: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    macs_before: int
    macs_after: int

    @property
    def kept(self) -> float:
        """Fraction of the weight's elements kept."""
        return math.prod(self.shape_after) / math.prod(self.shape_before)


@dataclass(frozen=True)
class CompactionReport:
    layers: tuple[LayerRow, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    latency: LatencyComparison | None
    hints: tuple[str, ...]

    @property
    def latency_before(self) -> Latency | None:
        return self.latency.before if self.latency else None

    @property
    def latency_after(self) -> Latency | None:
        return self.latency.after if self.latency else None

    @property
    def macs_ratio(self) -> float:
        """Dense MACs / compacted MACs (2.0 = half the MACs)."""
        return self.macs_before / self.macs_after

    @property
    def speedup(self) -> float | None:
        """Median over interleaved rounds of dense / compacted latency, when measured."""
        return self.latency.speedup if self.latency else None


def compaction_report(dense: nn.Module, compacted: nn.Module, input_shape: tuple[int, ...], *,
                      batch_size: int = 1, precision: str = "fp32", repeats: int = 30,
                      warmup: int = 5, rounds: int = 5) -> CompactionReport:
    """Compare a dense model with its compacted version (same module names).

    Hints explain a speed-up short of the MACs ratio: layers left dense, widths not a multiple
    of 8, depthwise convs. Latency comes from :func:`~prunekit.measure.latency.compare_latency`
    (``rounds`` alternating rounds sharing ``repeats`` calls per model) at ``batch_size`` and
    ``precision`` (fp32 NCHW, bf16 channels_last; ``repeats=0`` skips it).
    MACs follow the thop convention at batch 1.
    """
    macs_before = {r.name: r.macs for r in count_macs(dense, input_shape).rows}
    macs_after = {r.name: r.macs for r in count_macs(compacted, input_shape).rows}
    after = dict(compacted.named_modules())
    rows = []
    for name, module in dense.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if name not in after:
            raise UserError(f"report: the compacted model has no layer {name!r}; expected the same architecture")
        rows.append(LayerRow(name, type(module).__name__, tuple(weight.shape), tuple(after[name].weight.shape),
                             macs_before.get(name, 0), macs_after.get(name, 0)))
    latency = compare_latency(dense, compacted, tuple(input_shape), batch_size=batch_size, precision=precision,
                              channels_last=precision == "bf16", rounds=rounds,
                              repeats=max(1, repeats // rounds), warmup=warmup) if repeats else None
    report = CompactionReport(tuple(rows), sum(macs_before.values()), sum(macs_after.values()),
                              count_params(dense), count_params(compacted), latency, ())
    return replace(report, hints=tuple(_hints(report, after)))


def _hints(report: CompactionReport, modules: dict[str, nn.Module]) -> list[str]:
    weighted = [r for r in report.layers if r.type in ("Conv1d", "Conv2d", "Conv3d", "Linear")]
    hints = []
    short = report.speedup is not None and report.speedup < SHORTFALL * report.macs_ratio
    if short:
        hints.append(f"speed-up {report.speedup:.2f}x falls short of the MACs ratio {report.macs_ratio:.2f}x")
    dense = [r for r in weighted if r.shape_before == r.shape_after and r.macs_after]
    share = sum(r.macs_after for r in dense) / report.macs_after if report.macs_after else 0.0
    if share >= NOTABLE:
        top = ", ".join(r.name for r in sorted(dense, key=lambda r: -r.macs_after)[:3])
        hints.append(f"{len(dense)} layers left dense carry {share:.0%} of the remaining MACs (largest: {top})")
    odd = [r for r in weighted
           if r.shape_before != r.shape_after and r.shape_after[0] % 8 and not r.shape_before[0] % 8]
    if odd:
        listed = ", ".join(f"{r.name} ({r.shape_after[0]})" for r in odd[:3])
        hints.append(f"{len(odd)} compacted layers have output widths not a multiple of 8 (e.g. {listed}): "
                     "choose keep counts with round_to=8")
    depthwise = [r for r in weighted if _depthwise(modules.get(r.name))]
    dw_share = sum(r.macs_after for r in depthwise) / report.macs_after if report.macs_after else 0.0
    if dw_share >= NOTABLE:
        hints.append(f"depthwise convs carry {dw_share:.0%} of the remaining MACs; they are memory-bound, "
                     "so their channels save less time than MACs")
    if len(hints) == 1 and short:
        hints.append(f"no layer-level cause found: at batch {report.latency_after.batch_size}, per-op costs that "
                     "MACs do not count (memory traffic, norms, activations, dispatch) dominate; try a larger batch")
    if report.latency is not None and not report.latency.conclusive:
        low, high = report.latency.spread
        hints.insert(0, f"latency is inconclusive: the {len(report.latency.ratios)} interleaved rounds gave "
                        f"{low:.2f}x to {high:.2f}x (a busy machine, or no real difference); measure again")
    return hints


def _depthwise(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels
