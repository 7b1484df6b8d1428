"""From trained gates to channel masks: AutoBot's global-threshold bisection (METHODS §4.6).

Start at τ = 0.5, δ = 0.25. Each iteration keeps channel c of gate vector l iff λ_{l,c} > τ (a
vector that would keep nothing keeps its arg-max), measures F = ``macs_of(masks)``, stops when
|F − T| ≤ ``tolerance`` or after ``iterations`` tries, else raises τ by δ when F > T and lowers it
otherwise, and halves δ. One threshold for the whole network.

The official loop returns the last mask it tried, which can end far off target (its VGG-16 108M
and DenseNet-40 logs ran all 50 iterations and ended 214,928 and 137,880 MACs away) or above it
(it also stops on a mask up to ``tolerance`` above the target). :func:`threshold_gates` instead
stops only at ``T − tolerance ≤ F ≤ T`` and returns the closest tried mask at or below the target
(the minimal mask, one channel per vector, when none was; a :class:`UserError` when even that is
above the target). ``official_last=True`` reproduces the official loop and choice exactly, above
the target or not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prunekit.core.targets import MacsOf
from prunekit.errors import UserError

log = logging.getLogger(__name__)

TOLERANCE = 50_000
ITERATIONS = 50


@dataclass(frozen=True)
class ThresholdResult:
    """The chosen masks, their threshold and MACs, and every tried ``(threshold, MACs)``."""

    keep: dict[str, torch.Tensor]
    threshold: float
    macs: int
    iterations: int
    history: tuple[tuple[float, int], ...]


def masks_at(gates: Mapping[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """``λ > threshold`` per vector; a vector that would keep nothing keeps its arg-max."""
    out = {}
    for root, value in gates.items():
        mask = value.detach() > threshold
        if not mask.any():
            mask[value.detach().argmax()] = True
        out[root] = mask
    return out


def threshold_gates(gates: Mapping[str, torch.Tensor], target: float, macs_of: MacsOf, *,
                    tolerance: float = TOLERANCE, iterations: int = ITERATIONS,
                    official_last: bool = False) -> ThresholdResult:
    """Bisect one global gate threshold for ``target`` MACs (see the module doc)."""
    if not gates:
        raise UserError("gates: no gate vector to threshold")
    if not target > 0:
        raise UserError(f"target: expected a positive number of MACs, got {target!r}")
    cache: dict[tuple[bytes, ...], int] = {}

    def measure(keep: dict[str, torch.Tensor]) -> int:
        key = tuple(m.cpu().numpy().tobytes() for m in keep.values())
        if key not in cache:
            cache[key] = int(macs_of(keep))
        return cache[key]

    tau, delta = 0.5, 0.25
    tried: list[tuple[float, int, dict[str, torch.Tensor]]] = []
    for _ in range(iterations):
        keep = masks_at(gates, tau)
        macs = measure(keep)
        tried.append((tau, macs, keep))
        if abs(macs - target) <= tolerance and (official_last or macs <= target):
            break
        tau = tau + delta if macs > target else tau - delta
        delta /= 2
    history = tuple((t, f) for t, f, _ in tried)
    if official_last:
        tau, macs, keep = tried[-1]
    else:
        below = [entry for entry in tried if entry[1] <= target]
        if below:
            tau, macs, keep = max(below, key=lambda entry: entry[1])
        else:
            tau, keep = 1.0, masks_at(gates, 1.0)
            macs = measure(keep)
            if macs > target:
                raise UserError(f"target: {target:,.0f} MACs is out of reach: keeping one channel per gated "
                                f"layer already costs {macs:,}")
    log.info("gate threshold %.6f after %d iterations: %s MACs (target %s)", tau, len(tried), f"{macs:,}",
             f"{target:,.0f}")
    return ThresholdResult(keep, tau, macs, len(tried), history)
