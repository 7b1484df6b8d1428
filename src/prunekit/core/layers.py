"""Which layers a pruning method works on: globs over module names, by type, first conv and
classifier in or out (METHODS §0.2: each paper covers different tensors)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from torch import nn

from prunekit.errors import UserError

if TYPE_CHECKING:
    import torch

    from prunekit.core.groups import ChannelGroup

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv2d, nn.Linear)


def select_layers(model: nn.Module, patterns: str | Sequence[str] = "*",
                  types: tuple[type[nn.Module], ...] = PRUNABLE, *,
                  include_first_conv: bool = True, include_classifier: bool = False) -> dict[str, nn.Module]:
    """Layers of ``types`` whose name matches a glob in ``patterns`` and no ``!``-prefixed glob.

    The first conv is the first ``nn.Conv2d`` in module order; the classifier is the last
    ``nn.Linear``. The defaults (first conv in, classifier out) are a starting point: each method
    sets them as its paper did (METHODS §0.2: OCP prunes every conv and no Linear, NPTM all convs
    but no FC, Pruning On-the-Fly everything but the first conv).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    keep = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    modules = list(model.named_modules())
    first_conv = next((m for _, m in modules if isinstance(m, nn.Conv2d)), None)
    classifier = next((m for _, m in reversed(modules) if isinstance(m, nn.Linear)), None)
    return {name: m for name, m in modules
            if isinstance(m, types)
            and any(fnmatchcase(name, p) for p in keep) and not any(fnmatchcase(name, p) for p in drop)
            and (include_first_conv or m is not first_conv)
            and (include_classifier or m is not classifier)}


def require_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The named layers of ``model`` (a Conv/Linear each), or a one-line error naming the first unknown one."""
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), PRUNABLE)]
    if missing:
        raise UserError(f"masks: {missing[0]!r} is not a Conv2d/Linear layer of this {type(model).__name__}")
    return {n: modules[n] for n in names}


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
