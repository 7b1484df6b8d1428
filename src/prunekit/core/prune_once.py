"""One-shot pruning of a model to a target: pick layers, score, select, apply the masks.

The pieces (layers, scores, plans, masks, channel groups) stay independent; this module only
wires them for the common "prune this model once to that target" job. Removing the pruned
filters for good is :func:`prunekit.core.compaction.compact_masked`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from prunekit.core.layers import filter_prunable_layers
from prunekit.core.sparsifier import Sparsifier
from prunekit.core.targets import parse_target, table_macs
from prunekit.errors import UserError

log = logging.getLogger(__name__)


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
        from prunekit.core.groups import channel_groups  # Torch-Pruning only when asked for

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
