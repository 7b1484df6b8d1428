"""The scatter residual form of CIFAR ResNet basic blocks (AutoBot's placement, METHODS §4.6.4).

After pruning, a block's second conv computes only its kept outputs, which are added into their
positions of the full-width residual; the residual stream keeps its width::

    out = relu2(shortcut(x).index_add(1, kept, bn2(conv2(relu1(bn1(conv1(x)))))))

The registered transform ``"scatter_residual"`` (``keep = {conv2 name: kept indices}``) slices each
named block's ``conv2`` and ``bn2`` to the kept outputs and swaps the block for a
:class:`ScatterBlock` holding the same submodules (parameter names unchanged) plus a
parameter-free :class:`ScatterAdd` (0 MACs for :func:`~prunekit.measure.count_macs`, ``index_add``
in ONNX). The model format replays it on load, so the form saves, loads and exports.
:func:`prune_channels` is the physical pruning of a gated model: with ``scatter``, keys naming a
block's ``conv2`` are scattered; the others (channel-group roots, e.g. the blocks' ``conv1``) go
to :func:`~prunekit.core.compaction.compact`.

A block is recognised by its layout (``conv1``, ``bn1``, ``relu1``, ``conv2``, ``bn2``,
``shortcut``, ``relu2``, as :class:`prunekit.models.cifar_resnet.BasicBlock`), so core code does
not import the model zoo.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from prunekit.core.compaction import compact
from prunekit.core.manifest import Manifest
from prunekit.core.targets import MacsOf
from prunekit.core.transforms import apply_transform, register_transform
from prunekit.errors import UserError
from prunekit.measure.macs import count_macs

PARTS = ("conv1", "bn1", "relu1", "conv2", "bn2", "shortcut", "relu2")
TRANSFORM = "scatter_residual"


class ScatterAdd(nn.Module):
    """``into.index_add(1, index, values)``: ``values``' channels added at positions ``index``."""

    def __init__(self, index: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(list(index), dtype=torch.long), persistent=False)

    def forward(self, values: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        return into.index_add(1, self.index, values)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} channels"


class ScatterBlock(nn.Module):
    """A basic block whose ``conv2``/``bn2`` compute only the outputs ``scatter`` adds into the residual."""

    def __init__(self, block: nn.Module, index: Sequence[int]) -> None:
        super().__init__()
        for part in PARTS:
            setattr(self, part, getattr(block, part))
        self.scatter = ScatterAdd(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.scatter(out, self.shortcut(x)))


def basic_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's (not yet scattered) CIFAR basic blocks by name, in module order."""
    return {name: m for name, m in model.named_modules()
            if not isinstance(m, ScatterBlock) and all(hasattr(m, p) for p in PARTS)
            and isinstance(m.conv2, nn.Conv2d) and isinstance(m.bn2, nn.BatchNorm2d)}


def scatter_residual(model: nn.Module, keep: Mapping[str, Sequence[int] | torch.Tensor]) -> nn.Module:
    """Apply (and record) ``"scatter_residual"``: each named ``conv2`` keeps only outputs ``keep[name]``."""
    return apply_transform(model, TRANSFORM, keep={name: [int(i) for i in torch.as_tensor(kept).tolist()]
                                                   for name, kept in keep.items()})


@register_transform(TRANSFORM)
def _scatter(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    blocks = basic_blocks(model)
    for conv2, kept in keep.items():
        name = conv2.removesuffix(".conv2")
        if name == conv2 or name not in blocks:
            raise UserError(f"{TRANSFORM}.keep: {conv2!r} is not the conv2 of a CIFAR basic block; "
                            f"expected one of {', '.join(f'{b}.conv2' for b in blocks)}")
        block = blocks[name]
        width = block.conv2.out_channels
        if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= width:
            raise UserError(f"{TRANSFORM}.keep[{conv2!r}]: expected sorted distinct indices in [0, {width})")
        removed = sorted(set(range(width)) - set(kept))
        tp.prune_conv_out_channels(block.conv2, removed)
        tp.prune_batchnorm_out_channels(block.bn2, removed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ScatterBlock(block, kept))
    return model


def prune_channels(model: nn.Module, keep: Mapping[str, torch.Tensor], example_input: torch.Tensor, *,
                   scatter: bool = False, verify: bool = True) -> tuple[nn.Module, Manifest]:
    """Physically remove every channel not in ``keep`` (``{root or conv2 name: kept indices}``), in place.

    With ``scatter`` (gates placed with ``residual="scatter"``), keys naming a basic block's
    ``conv2`` take the scatter form; every other key names a channel group, compacted (with
    ``verify``, checked against the masked model). Returns the model and the compaction's manifest.
    """
    blocks = {f"{name}.conv2" for name in basic_blocks(model)} if scatter else set()
    scattered = {name: kept for name, kept in keep.items() if name in blocks}
    grouped = {name: kept for name, kept in keep.items() if name not in blocks}
    manifest = compact(model, grouped, example_input, verify=verify).manifest if grouped else Manifest({}, {})
    if scattered:
        scatter_residual(model, scattered)
    return model, manifest


def pruned_macs(model: nn.Module, example_input: torch.Tensor, *, scatter: bool = False) -> MacsOf:
    """A ``MacsOf`` that prunes a copy of ``model`` with :func:`prune_channels` and counts its MACs."""

    def macs_of(keep: Mapping[str, torch.Tensor]) -> int:
        pruned, _ = prune_channels(copy.deepcopy(model), {n: m.flatten().nonzero().flatten() for n, m in keep.items()},
                                   example_input, scatter=scatter, verify=False)
        return count_macs(pruned, example_input).total

    return macs_of
