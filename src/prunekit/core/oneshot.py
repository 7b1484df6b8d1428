"""One-shot pruning of a model: pick layers, score, select to a target, optionally compact.

The pieces (Sparsifier, channel groups, compaction) stay independent; this module only wires
them for the common "prune this checkpoint to that target" job the CLI and methods share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.core.compaction import CompactionResult, compact
from prunekit.core.groups import channel_groups
from prunekit.core.sparsifier import Sparsifier
from prunekit.core.targets import parse_target, table_macs
from prunekit.errors import UserError

log = logging.getLogger(__name__)


def filter_prunable_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Roots of the channel groups that can be removed, classifier outputs excluded.

    A group coupled to something that cannot shrink (an option-A shortcut, a grouped conv, a
    LayerNorm across channels) is left out, so residual widths of such models stay whole. Each
    group is ranked by its root layer's filters.
    """
    classifier = next((name for name, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
    groups = channel_groups(model, example_input)
    for group in groups:
        if group.blocked:
            log.info("not pruning group %s: %s", group.root, group.blocked)
    return [g.root for g in groups if not g.blocked and classifier not in g.out_layers]


@dataclass
class OneShotResult:
    sparsifier: Sparsifier | None  # None when a caller compacts without masks
    compaction: CompactionResult | None


def prune_once(model: nn.Module, example_input: torch.Tensor, *, target: str, granularity: str = "filter",
               criterion: str = "l1", scope: str = "local", round_to: int | None = None,
               compact_model: bool = True, seed: int = 0) -> OneShotResult:
    """Prune ``model`` in place to ``target`` (``weights=…``, ``filters=…`` or ``macs=…``).

    Filter granularity prunes the removable channel groups and, with ``compact_model``,
    physically removes them (the compacted model is checked against the masked one). In global
    scope filter scores are divided by their layer's mean first: raw L1 sums grow with fan-in,
    so unnormalised they would empty thin layers such as the stem. Other granularities prune
    every conv (the classifier stays dense) and leave zeros in place.
    """
    parsed = parse_target(target)
    structured = granularity in ("filter", "channel")
    if parsed.unit == "macs" and granularity != "filter":
        raise UserError(f"target: {parsed} needs --granularity filter (removing weights saves no MACs)")
    if structured:
        layers = filter_prunable_layers(model, example_input)
        if not layers:
            raise UserError("model: no channel group of this model can be removed")
        macs_of = table_macs(model, example_input) if parsed.unit == "macs" else None
        sparsifier = Sparsifier(model, granularity, criterion, scope, layers, round_to=round_to,
                                macs_of=macs_of, normalize=scope == "global", seed=seed)
        if parsed.unit == "macs" and scope == "local":
            parsed = uniform_fraction_for_macs(sparsifier, parsed.fraction, macs_of)
    else:
        sparsifier = Sparsifier(model, granularity, criterion, scope, types=(nn.Conv2d,), seed=seed)
    if structured and not compact_model:
        sparsifier.couple_channels(model, example_input)  # the zeros then compute what removal will
    sparsifier.update(parsed)
    if not (structured and compact_model):
        return OneShotResult(sparsifier, None)
    keep = {name: mask.nonzero().flatten() for name, mask in sparsifier.unit_masks().items()}
    sparsifier.squash()
    return OneShotResult(sparsifier, compact(model, keep, example_input))


def uniform_fraction_for_macs(sparsifier: Sparsifier, fraction: float, macs_of, steps: int = 20) -> float:
    """The smallest per-layer filter fraction whose masks remove at least ``fraction`` of the MACs.

    Local scope with a MACs target: every layer loses the same share of its filters (rounded by
    the sparsifier's ``round_to``), found by bisection on that share; masks are only planned,
    never applied, during the search.
    """
    def macs(share: float) -> int:
        return macs_of(sparsifier.plan(share))

    budget = (1 - fraction) * macs(0.0)
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (low, mid) if macs(mid) <= budget else (mid, high)
    if macs(high) > budget:
        raise UserError(f"target: macs={fraction:g} is out of reach with the same share of filters per layer")
    log.info("macs target %g met by removing %.4f of the filters of every layer", fraction, high)
    return high
