"""One-shot pruning of a model to a target: pick layers, score, select, apply the masks.

The pieces (layers, scores, plans, masks, channel groups) stay independent; this module only
wires them for the common "prune this model once to that target" job. Removing the pruned
filters for good is :func:`prunekit.core.compaction.compact_masked`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.core.sparsifier import Sparsifier
from prunekit.core.targets import parse_target, table_macs
from prunekit.errors import UserError

if TYPE_CHECKING:
    from prunekit.core.groups import ChannelGroup

log = logging.getLogger(__name__)


def filter_prunable_layers(model: nn.Module, example_input: torch.Tensor,
                           groups: Sequence[ChannelGroup] | None = None) -> list[str]:
    """Roots of the channel groups that can be removed, classifier outputs excluded.

    A group coupled to something that cannot shrink (an option-A shortcut, a grouped conv, a
    LayerNorm across channels) is left out, so residual widths of such models stay whole. Each
    group is ranked by its root layer's filters. ``groups``: the model's channel groups, if built.
    """
    from prunekit.core.groups import channel_groups  # Torch-Pruning only when asked for

    classifier = next((name for name, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
    groups = groups if groups is not None else channel_groups(model, example_input)
    for group in groups:
        if group.blocked:
            log.info("not pruning group %s: %s", group.root, group.blocked)
    return [g.root for g in groups if not g.blocked and classifier not in g.out_layers]


def prune_once(model: nn.Module, example_input: torch.Tensor, *, target: str, granularity: str = "filter",
               criterion: str = "l1", scope: str = "local", round_to: int | None = None,
               seed: int = 0, **layer_choice: Any) -> Sparsifier:
    """Mask ``model`` in place to ``target`` (``weights=…``, ``filters=…`` or ``macs=…``); the Sparsifier.

    Filter granularity prunes the removable channel groups (in global scope filter scores are
    divided by their layer's mean first: raw L1 sums grow with fan-in, so unnormalised they
    would empty thin layers such as the stem). Other granularities leave zeros in place in the
    layers ``layer_choice`` selects (:func:`~prunekit.core.layers.select_layers` arguments;
    by default every Conv2d and Linear but the classifier).
    """
    parsed = parse_target(target)
    if parsed.unit == "macs" and granularity != "filter":
        raise UserError(f"target: {parsed} needs granularity filter (removing weights saves no MACs)")
    if granularity in ("filter", "channel"):
        from prunekit.core.groups import channel_groups

        groups = channel_groups(model, example_input)
        layers = filter_prunable_layers(model, example_input, groups)
        if not layers:
            raise UserError(f"model: no channel group of this {type(model).__name__} can be removed")
        macs_of = table_macs(model, example_input, groups) if parsed.unit == "macs" else None
        sparsifier = Sparsifier(model, granularity, criterion, scope, layers, round_to=round_to,
                                macs_of=macs_of, normalize=scope == "global", seed=seed)
    else:
        sparsifier = Sparsifier(model, granularity, criterion, scope, seed=seed, **layer_choice)
    sparsifier.update(parsed)
    return sparsifier
