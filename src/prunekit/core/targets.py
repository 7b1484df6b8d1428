"""Pruning targets that name their unit, and meeting a MACs target by bisection.

``weights=0.9`` removes 90% of the pruned layers' weights, ``filters=0.5`` half of their filters
(or input channels, with channel granularity), ``macs=0.5`` half of the whole model's MACs
(thop convention, METHODS §0.1). The number is always the fraction **removed**, in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunekit.core.selection import round_kept, top_k_mask
from prunekit.errors import UserError

if TYPE_CHECKING:
    from prunekit.core.groups import ChannelGroup

log = logging.getLogger(__name__)

UNITS = ("weights", "filters", "macs")
_NEEDS_UNIT = "target needs a unit: weights=…, filters=… or macs=…"

MacsOf = Callable[[Mapping[str, torch.Tensor]], int]
"""MACs of the model once each named layer keeps only the filters its boolean mask marks."""


@dataclass(frozen=True)
class Target:
    """A fraction of ``unit`` to remove."""

    unit: str
    fraction: float

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UserError(f"target: unknown unit {self.unit!r}; expected weights, filters or macs")
        value = self.fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            hint = f"; write {self.unit}={value / 100:g} for {value:g}%" if _percent_like(value) else ""
            raise UserError(f"target: {self.unit} expects a fraction removed in [0, 1], got {value!r}{hint}")

    def __str__(self) -> str:
        return f"{self.unit}={self.fraction:g}"


def _percent_like(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 1 < value <= 100


def parse_target(spec: str | Target) -> Target:
    """Parse ``"weights=0.9"``, ``"filters=0.5"`` or ``"macs=0.5"`` (fraction removed)."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str) or "=" not in spec:
        raise UserError(f"{_NEEDS_UNIT} (got {spec!r})")
    unit, _, text = (part.strip() for part in spec.partition("="))
    unit = unit.lower()
    if unit not in UNITS:
        raise UserError(f"target: unknown unit {unit!r} in {spec!r}; expected weights, filters or macs")
    if text.endswith("%"):
        raise UserError(f"target: percentages are not accepted in {spec!r}; write a fraction, "
                        f"e.g. {unit}=0.9 for 90%")
    try:
        value = float(text) if text.isascii() else None  # float() also reads '٠.٥'
    except ValueError:
        value = None
    if value is None:
        raise UserError(f"target: expected a number (ASCII digits) after '{unit}=', got {text!r}")
    return Target(unit, value)


def bisect_macs(scores: Mapping[str, torch.Tensor], fraction: float, macs_of: MacsOf,
                round_to: int | None = None) -> dict[str, torch.Tensor]:
    """Filter masks that remove at least ``fraction`` of the MACs, keeping as many filters as possible.

    Filters are ranked globally by score (ties: layer order, then index), except that each layer's
    best filter comes first so no layer is emptied; ``-inf`` scores are never kept. Bisection on the
    number kept from the top of that ranking (= on a global score threshold) finds the largest set
    whose ``macs_of`` fits the budget ``(1 − fraction) · dense MACs``: adding the next filter would
    exceed it, so the result is within one filter's MACs of the target. With ``round_to``, each
    layer's count from the global ranking is rounded to a multiple of it and that many of its best
    filters are kept (counts only grow with the number ranked in, so the bisection still holds).
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    sizes = [scores[n].numel() for n in names]
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    best = [start + int(torch.argmax(scores[n].detach().flatten())) for n, start in zip(names, starts)]
    best = [i for i in best if torch.isfinite(flat[i])]
    priority = flat.clone()
    priority[best] = float("inf")
    order = torch.sort(-priority, stable=True).indices
    order = order[: int(torch.isfinite(flat).sum())]

    def masks(k: int) -> dict[str, torch.Tensor]:
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[order[:k]] = True
        pieces = {n: piece.view(scores[n].shape) for n, piece in zip(names, kept.split(sizes))}
        if round_to is None:
            return pieces
        return {n: top_k_mask(scores[n], round_kept(int(p.sum()), p.numel(), round_to)) for n, p in pieces.items()}

    dense = macs_of({n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()})
    budget = (1 - fraction) * dense
    low, high = len(best), len(order)
    floor = macs_of(masks(low))
    if floor > budget:
        fewest = f"{round_to} filters (round_to)" if round_to else "one filter"
        raise UserError(f"target: macs={fraction:g} is out of reach: keeping {fewest} per pruned layer "
                        f"already costs {floor:,} of {dense:,} MACs")
    while low < high:
        mid = (low + high + 1) // 2
        if macs_of(masks(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    chosen = masks(low)
    log.info("macs target %g: kept %d of %d filters, budget %d of %d MACs", fraction,
             sum(int(m.sum()) for m in chosen.values()), flat.numel(), int(budget), dense)
    return chosen


def table_macs(model: nn.Module, example_input: torch.Tensor,
               groups: Sequence[ChannelGroup] | None = None) -> MacsOf:
    """A ``MacsOf`` read from the model's per-layer cost table (:class:`~prunekit.core.costs.CostModel`).

    One trace of the model; each call then costs a few tensor ops and equals ``count_macs`` on
    the model compacted to the masks. ``groups``: the model's channel groups, if already built.
    """
    from prunekit.core.costs import CostModel  # Torch-Pruning only when asked for

    return CostModel.build(model, example_input, None if groups is None else list(groups)).macs
