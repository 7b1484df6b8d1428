"""Physically remove output channels, following Torch-Pruning's dependency graph.

The graph propagates each removal to every coupled tensor (the BN after a conv, the input
channels of its consumers, residual partners, depthwise groups, concatenations).
"""

from __future__ import annotations

import logging

import torch
import torch_pruning as tp
from torch import nn

from prunekit.errors import UserError

log = logging.getLogger(__name__)


def remove_output_channels(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor) -> nn.Module:
    """Keep only the listed output channels of each named conv/linear layer, in place.

    ``keep`` maps a module name (as in ``named_modules``) to the indices to keep. Torch-Pruning
    replaces the parameter objects: rebuild or re-bind any optimizer afterwards.
    """
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    for name, kept in keep.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise UserError(f"keep: {name!r} is not a Conv2d or Linear layer of the model")
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        removed = sorted(set(range(channels)) - set(kept.tolist()))
        if not removed:
            continue
        if len(removed) == channels:
            raise UserError(f"keep: layer {name!r} would keep no channel")
        group = graph.get_pruning_group(layer, tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d)
                                        else tp.prune_linear_out_channels, idxs=removed)
        if not graph.check_pruning_group(group):
            raise UserError(f"keep: removing channels of {name!r} is not allowed by the dependency graph")
        group.prune()
        log.debug("removed %d of %d channels of %s", len(removed), channels, name)
    model.train(was_training)
    return model
