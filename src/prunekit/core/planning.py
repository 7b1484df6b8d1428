"""A plan per target kind: unit scores + a target → which units each layer keeps.

* ``units``: a fraction of the granularity's units, per layer (``local``) or in one ranking
  (``global``; ``normalize`` divides each layer's scores by their mean first), layers in
  ``overrides`` pinned at their own fraction;
* ``nm``: N of every M weights;
* ``macs``: a fraction of the model's MACs, priced by a ``MacsOf`` counter (the cost model),
  by bisection on a global score threshold (``global``) or on one share of filters for every
  layer (``local``).

Pure functions of the scores: nothing here touches a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from prunekit.core.granularity import NM, Filter, Granularity
from prunekit.core.selection import global_masks, local_masks, nm_mask, normalise
from prunekit.core.targets import MacsOf, Target, bisect_macs, parse_target
from prunekit.errors import UserError

log = logging.getLogger(__name__)

Units = dict[str, torch.Tensor]
"""Layer name -> one boolean per unit, True where kept."""


def goal(target: Target | str | float | None, granularity: Granularity, *, macs: bool = False,
         overrides: bool = False) -> tuple[str, float]:
    """``(kind, fraction)`` for a target: kind ``nm``, ``macs`` or ``units``.

    A float is the fraction of the granularity's units removed; ``weights=…`` needs weight or
    kernel granularity, ``filters=…`` filter or channel, ``macs=…`` filter and a MACs counter.
    """
    if isinstance(granularity, NM):
        if target is not None and abs(_fraction(target, "weights", granularity) - granularity.sparsity) > 1e-9:
            raise UserError(f"target: granularity {granularity} fixes the sparsity at {granularity.sparsity:g}; "
                            f"got {target}")
        return "nm", granularity.sparsity
    if target is None:
        raise UserError("target: needs a target such as 'weights=0.9' or a sparsity")
    if isinstance(target, (str, Target)) and parse_target(target).unit == "macs":
        if not isinstance(granularity, Filter) or not macs or overrides:
            raise UserError("target: macs=… needs granularity 'filter', a macs_of counter and no overrides")
        return "macs", parse_target(target).fraction
    return "units", _fraction(target, "filters" if granularity.structured else "weights", granularity)


def _fraction(target: Target | str | float, unit: str, granularity: Granularity) -> float:
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        if not 0 <= target <= 1:
            raise UserError(f"sparsity: expected a fraction in [0, 1], got {target!r}")
        return float(target)
    parsed = parse_target(target)
    if parsed.unit != unit:
        raise UserError(f"target: {parsed} does not fit granularity {granularity}; it prunes {unit}, use {unit}=…")
    return parsed.fraction


def plan_units(scores: Mapping[str, torch.Tensor], fraction: float, *, scope: str = "local",
               overrides: Mapping[str, float] | None = None, round_to: int | None = None,
               normalize: bool = False) -> Units:
    """Remove ``fraction`` of the units, layers in ``overrides`` at their own fraction."""
    overrides = dict(overrides or {})
    pinned = local_masks({n: scores[n] for n in overrides}, overrides, round_to)
    free = {name: s for name, s in scores.items() if name not in overrides}
    if scope == "local":
        return pinned | local_masks(free, dict.fromkeys(free, fraction), round_to)
    return pinned | global_masks(ranked(free, normalize), fraction, round_to)


def plan_nm(scores: Mapping[str, torch.Tensor], n: int) -> Units:
    return {name: nm_mask(s, n) for name, s in scores.items()}


def plan_macs(scores: Mapping[str, torch.Tensor], fraction: float, macs_of: MacsOf, *, scope: str = "global",
              round_to: int | None = None, normalize: bool = True) -> Units:
    """Filters to keep so that at least ``fraction`` of the MACs go (see the module doc)."""
    if scope == "global":
        return bisect_macs(ranked(scores, normalize), fraction, macs_of, round_to)
    share = uniform_share_for_macs(scores, fraction, macs_of, round_to)
    return local_masks(scores, dict.fromkeys(scores, share), round_to)


def uniform_share_for_macs(scores: Mapping[str, torch.Tensor], fraction: float, macs_of: MacsOf,
                           round_to: int | None = None, steps: int = 20) -> float:
    """The smallest share of filters removed from every layer whose masks remove at least
    ``fraction`` of the MACs (bisection on the share; masks are only planned). Every layer
    keeps at least one filter."""
    def macs(share: float) -> int:
        return macs_of(local_masks(scores, dict.fromkeys(scores, share), round_to))

    budget = (1 - fraction) * macs(0.0)
    low, high = 0.0, min(1 - 0.5 / s.numel() for s in scores.values()) - 1e-9
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (low, mid) if macs(mid) <= budget else (mid, high)
    if macs(high) > budget:
        raise UserError(f"target: macs={fraction:g} is out of reach with the same share of filters per layer")
    log.info("macs target %g met by removing %.4f of the filters of every layer", fraction, high)
    return high


def ranked(scores: Mapping[str, torch.Tensor], normalize: bool) -> dict[str, torch.Tensor]:
    """Scores as ranked across layers: divided by their layer's mean when ``normalize``."""
    return {name: normalise(s) for name, s in scores.items()} if normalize else dict(scores)
