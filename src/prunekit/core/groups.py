"""Prunable channel groups, read from Torch-Pruning's dependency graph.

A group is a set of channels that must be removed together: the output channels of one or
more layers (residual partners share them) plus everything they feed (the BN after a conv,
the input channels of consumers, depthwise convs, concatenation slots, layer scales). Each
group is named by its root: the first layer in module order whose output channels it holds.

A group is *blocked* when masking its channels would not compute what removing them does,
or when Torch-Pruning cannot follow it; its ``blocked`` field says which op and why. Walking
a group takes bounded time and memory (a shifted-window attention would otherwise never end),
and an error inside Torch-Pruning is a :class:`~prunekit.errors.UserError` naming the model.
"""

from __future__ import annotations

import logging
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from prunekit.core.selection import keep_count
from prunekit.errors import UserError

log = logging.getLogger(__name__)
_TP_DIR = os.path.dirname(tp.__file__)

_OPAQUE: dict[type[nn.Module], str] = {}
"""Parameter-free layers Torch-Pruning would wrongly treat as element-wise: never pruned through."""

WORK_PER_CHANNEL, WORK_LIMIT = 8192, 8_000_000
"""Indices the walk of one group may map, per root channel and in all; past them the group is blocked.

Real couplings stay far below: a ViT-B/16 residual stream maps about 1000 per channel, a
DenseNet-121 block about 850, a VGG flatten about 350.
"""

_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)
_SUPPORTED = (*_ROOTS, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)
_ACROSS_CHANNELS = (nn.LayerNorm, nn.GroupNorm)
_OUTPUT = "its channels are the model's output"
_RESHAPE = "Torch-Pruning's channel index mapping runs past the tensor (a reshape it cannot follow)"
_PERMUTE = ("its channels pass through a permute/transpose and a reshape, whose channel order "
            "Torch-Pruning cannot follow")
_REORDERING = {
    _PERMUTE: ("PermuteBackward", "TransposeBackward"),
    "its channels pass through an op that reorders channels, which Torch-Pruning cannot follow":
        ("PixelShuffleBackward", "PixelUnshuffleBackward", "ChannelShuffleBackward", "NativeChannelShuffleBackward"),
}
"""Parameter-free ops Torch-Pruning treats as element-wise although they move channels."""


class _OpaquePruner(tp.pruner.BasePruningFunc):
    """Cuts the graph at a layer (distinct in/out functions) so its channels stay uncoupled."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise UserError(f"cannot remove channels through {type(layer).__name__}")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise UserError(f"cannot remove channels through {type(layer).__name__}")

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "out_channels", None)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "in_channels", None)


def register_opaque(cls: type[nn.Module], why: str) -> None:
    """Never prune through layers of type ``cls``; a group coupled to one is blocked with ``why``.

    For parameter-free layers that move channels (padding, offsets) which Torch-Pruning would
    treat as element-wise.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_opaque: expected an nn.Module subclass, got {cls!r}")
    _OPAQUE[cls] = why


@dataclass(frozen=True, eq=False)
class Coupled:
    """One dimension of one parameter that moves with the group's channels.

    Entry ``position[i]`` along ``dim`` belongs to root channel ``root_channel[i]`` (several
    positions per channel after a flatten; a concatenation offsets them).
    """

    param: str
    dim: int
    shape: tuple[int, ...]
    position: torch.Tensor
    root_channel: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of ``root`` and every tensor coupled to them.

    ``members`` lists ``(name, role)`` for every coupled layer or bare parameter: ``"out"`` for
    a Conv/Linear whose output channels these are, ``"in"`` for a layer that consumes or carries
    them (a consumer's input channels, a norm layer), ``"param"`` for a bare parameter.
    ``coupled`` lists the parameter dimensions that shrink; ``blocked`` says why the group
    cannot be removed (None when it can).
    """

    root: str
    channels: int
    members: tuple[tuple[str, str], ...]
    coupled: tuple[Coupled, ...]
    blocked: str | None = None

    @property
    def out_layers(self) -> tuple[str, ...]:
        """Layers whose output channels are this group's channels (root first)."""
        return tuple(name for name, role in self.members if role == "out")

    def keep_count(self, fraction_removed: float, round_to: int = 1) -> int:
        """Channels kept when removing ``fraction_removed``, rounded to a multiple of ``round_to``.

        Compacted layers run faster when widths are multiples of 8; the count is rounded to the
        nearest multiple (at least one multiple, at most all channels).
        """
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise UserError(f"round_to: expected an integer >= 1, got {round_to!r}")
        kept = keep_count(self.channels, fraction_removed)
        if round_to > 1 and kept > 0:
            kept = min(self.channels, max(round_to, round_to * round(kept / round_to)))
        return kept

    def positions(self, keep: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        """Kept positions along each coupled ``(parameter, dim)`` when root channels ``keep`` stay."""
        keep = self.check_keep(keep)
        out: dict[tuple[str, int], torch.Tensor] = {}
        for c in self.coupled:
            removed = c.position[~torch.isin(c.root_channel, keep)]
            kept = torch.ones(c.shape[c.dim], dtype=torch.bool)
            kept[removed] = False
            key = (c.param, c.dim)
            out[key] = kept.nonzero().flatten() if key not in out else out[key][kept[out[key]]]
        return out

    def masks(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean masks (parameter shape) under which the model computes what removal would.

        Zeroes the root's filters and bias, the coupled BN's weight and bias (BN(x) = 0 when
        gamma = beta = 0), depthwise filters, layer scales and the consumers' input channels.
        """
        shapes = {c.param: c.shape for c in self.coupled}
        out: dict[str, torch.Tensor] = {}
        for (param, dim), kept in self.positions(keep).items():
            line = torch.zeros(shapes[param][dim], dtype=torch.bool)
            line[kept] = True
            view = [1] * len(shapes[param])
            view[dim] = -1
            mask = line.view(view).expand(shapes[param])
            out[param] = mask.clone() if param not in out else out[param] & mask
        return out

    def check_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` as sorted CPU indices, or a :class:`UserError` saying what is wrong with it."""
        keep = torch.as_tensor(keep).detach().cpu()
        if keep.dim() != 1 or keep.is_floating_point() or keep.dtype == torch.bool:
            raise UserError(f"keep[{self.root!r}]: expected a 1-D tensor of channel indices")
        if keep.numel() == 0:
            raise UserError(f"keep[{self.root!r}]: would keep no channel")
        if keep.min() < 0 or keep.max() >= self.channels or keep.unique().numel() != keep.numel():
            raise UserError(f"keep[{self.root!r}]: expected distinct indices in [0, {self.channels})")
        return keep.long().sort().values


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``model`` (traced in eval mode; the training flag is restored).

    A model Torch-Pruning cannot trace raises a :class:`UserError` naming the model and the op.
    """
    modes = {m: m.training for m in model.modules()}
    pruner = _OpaquePruner()
    try:
        with torch.enable_grad(), _refused(model, "build its channel dependency graph"):
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False,
                customized_pruners={cls: pruner for cls in _OPAQUE},
            )
    finally:
        for module, training in modes.items():
            module.training = training


def channel_groups(model: nn.Module, example_input: torch.Tensor, layers: Iterable[str] | None = None,
                   *, graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
    """Every channel group of the model's Conv/Linear layers, in module order.

    ``layers`` keeps only the groups holding the output channels of one of those layers.
    ``graph`` reuses a graph from :func:`dependency_graph` built on the same model. The walk of
    each group is bounded (see :func:`_pruning_group`); one that cannot finish is blocked.
    """
    graph = graph or dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    params = {p: name for name, p in model.named_parameters()}
    wanted = None if layers is None else set(layers)
    seen: set[str] = set()
    groups = []
    with _refused(model, "enumerate its channel groups"):
        tp.dependency.index_mapping.update_index_mapping(graph)
        for name, module in model.named_modules():
            if name in seen or not isinstance(module, _ROOTS) or module not in graph.module2node:
                continue
            channels = graph.get_pruner_of_module(module).get_out_channels(module)
            items, stopped = _pruning_group(graph, module, channels, names)
            group = _describe(graph, items, name, channels, names, params, stopped)
            seen.update(group.out_layers)
            if wanted is None or wanted & set(group.out_layers):
                groups.append(group)
    return groups


def group_masks(groups: Iterable[ChannelGroup], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks of several groups at once, combined where they overlap.

    ``keep`` is keyed like :func:`~prunekit.core.compaction.compact`'s: by a layer whose output
    channels the group holds (its root or a residual partner).
    """
    by_layer = {layer: g for g in groups for layer in g.out_layers}
    out: dict[str, torch.Tensor] = {}
    for layer, kept in keep.items():
        if layer not in by_layer:
            raise UserError(f"keep: {layer!r} is not a Conv/Linear layer of these channel groups")
        for param, mask in by_layer[layer].masks(kept).items():
            out[param] = mask if param not in out else out[param] & mask
    return out


@dataclass(frozen=True)
class _Item:
    """One dependency of a group: the indices it removes on its target, and their root channels."""

    dep: tp.Dependency
    idxs: list[int]
    root_idxs: list[int]


def _pruning_group(graph: tp.DependencyGraph, module: nn.Module, channels: int,
                   names: dict[nn.Module, str]) -> tuple[list[_Item], str | None]:
    """What ``graph.get_pruning_group(module, prune_out_channels, all channels)`` returns, bounded.

    The same closure: every index (with its root channel) reachable from the root's channels
    through the dependencies and their index mappings, merged per (target, handler). Torch-Pruning
    re-walks a path whenever an index list differs from those seen before, which never ends
    when its mappings send two root channels to one position (shifted windows, grid attention);
    here each index is followed once, the walk stops at the first such position, and at the
    latest after :data:`WORK_PER_CHANNEL` (at most :data:`WORK_LIMIT`) mapped indices. The second
    value says why it stopped.
    """
    fn = graph.get_pruner_of_module(module).prune_out_channels
    if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels  # as get_pruning_group does
    node = graph.module2node[module]
    stack = [(tp.Dependency(fn, fn, source=node, target=node),
              [tp._helpers._HybridIndex(idx=i, root_idx=i) for i in range(channels)])]
    deps = {(node, fn): stack[0][0]}
    roots = {(node, fn): {i: i for i in range(channels)}}  # (target, handler) -> index -> root channel
    work, budget = 0, min(WORK_LIMIT, WORK_PER_CHANNEL * channels)
    try:
        while stack:
            dep, idxs = stack.pop()
            for new in dep.target.dependencies:
                if not new.is_triggered_by(dep.handler):
                    continue
                mapped = idxs
                work = _spend(work, len(mapped), budget, new.target, names)
                for mapping in (m for m in new.index_mapping if m is not None):
                    work = _spend(work, _mapped_size(mapping, len(mapped)), budget, new.target, names)
                    mapped = mapping(mapped)
                key = (new.target, new.handler)
                deps.setdefault(key, new)
                seen = roots.setdefault(key, {})
                fresh = [i for i in dict.fromkeys(mapped) if _fresh(seen, i, new.target, names)]
                if fresh:
                    stack.append((new, fresh))
        stopped = None
    except _Stop as exc:
        stopped = str(exc)
    log.debug("group of %r: %d indices mapped", names[module], work)
    return [_Item(deps[key], list(at), list(at.values())) for key, at in roots.items() if at], stopped


class _Stop(Exception):
    """The walk of a group cannot go on; the message says why (a blocking reason)."""


def _spend(work: int, n: int, budget: int, at: tp.Node, names: dict[nn.Module, str]) -> int:
    if work + n > budget:
        raise _Stop(f"Torch-Pruning's channel coupling did not close within {budget} mapped indices "
                    f"(at {_op(at, names)})")
    return work + n


def _mapped_size(mapping: object, n: int) -> int:
    """Most indices ``mapping`` returns for ``n``: Torch-Pruning's flatten mapping multiplies by its stride."""
    return n if getattr(mapping, "reverse", True) else n * getattr(mapping, "_stride", 1)


def _fresh(seen: dict[int, int], index: tp._helpers._HybridIndex, at: tp.Node, names: dict[nn.Module, str]) -> bool:
    """Record ``index`` at a target: False when already there, :class:`_Stop` when from another root."""
    if index.idx not in seen:
        seen[index.idx] = index.root_idx
        return True
    if seen[index.idx] != index.root_idx:
        raise _Stop(f"Torch-Pruning sends two of its channels to one position at {_op(at, names)}, "
                    "which removal cannot follow")
    return False


def _describe(graph: tp.DependencyGraph, items: list[_Item], root: str, channels: int,
              names: dict[nn.Module, str], params: dict[nn.Parameter, str], stopped: str | None) -> ChannelGroup:
    members: list[tuple[str, str]] = []
    coupled: list[Coupled] = []
    blocked: dict[str, list[str]] = {stopped: []} if stopped else {}  # why -> layer names
    reorders: dict[str, list[str]] = {}  # why -> ops that reorder channels
    reshaped = any(item.dep.target.type == tp.ops.OPTYPE.RESHAPE for item in items)
    for item in items:
        node, module = item.dep.target, item.dep.target.module
        if isinstance(module, nn.Parameter):
            coupled.append(_coupled(params[module], module, node.pruning_dim, item))
            members.append((params[module], "param"))
            continue
        if node.type == tp.ops.OPTYPE.OUTPUT:
            blocked.setdefault(_OUTPUT, [])
        if module not in names:  # Torch-Pruning's parameter-free ops (add, cat, flatten, slice, ...)
            op = node.grad_fn.name() if hasattr(node.grad_fn, "name") else ""
            for why, kinds in _REORDERING.items():
                if any(op.startswith(k) for k in kinds):
                    reorders.setdefault(why, []).append(op)
            continue
        name = names[module]
        out = isinstance(module, _ROOTS) and item.dep.handler == graph.get_pruner_of_module(module).prune_out_channels
        role = "out" if out else "in"
        members.append((name, role))
        why = _why_blocked(module)
        if out and not node.outputs:
            why = _OUTPUT
        if why:
            blocked.setdefault(why, []).append(name)
            continue
        for param, dim in _dims(module, role):
            coupled.append(_coupled(f"{name}.{param}" if name else param, getattr(module, param), dim, item))
    for why, ops in reorders.items():
        if why != _PERMUTE or reshaped:
            blocked[why] = ops
    for c in coupled:
        if c.position.numel() and int(c.position.max()) >= c.shape[c.dim]:
            blocked.setdefault(_RESHAPE, []).append(c.param)
    return ChannelGroup(root, channels, tuple(members), tuple(coupled), _reason(blocked))


@contextmanager
def _refused(model: nn.Module, task: str) -> Iterator[None]:
    """An error raised inside Torch-Pruning becomes one line naming the model and the op it was at."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)]
        if not any(f.f_code.co_filename.startswith(_TP_DIR) for f in frames):
            raise  # prunekit's own failure, not the user's
        held = ([v for v in f.f_locals.values() if isinstance(v, tp.Node)] for f in reversed(frames))
        node = next((nodes[0] for nodes in held if nodes), None)  # the innermost frame's first node
        at = f" at {_op(node, {m: n for n, m in model.named_modules()})}" if node is not None else ""
        detail = "".join(str(exc).splitlines()[:1])
        raise UserError(f"{type(model).__name__}: Torch-Pruning cannot {task}: {type(exc).__name__}{at}"
                        f"{': ' + detail if detail else ''}") from exc


def _op(node: tp.Node, names: dict[nn.Module, str]) -> str:
    """A node as a user can find it: its layer's name, or its op and the nearest layer before it."""
    if node.module in names:
        return repr(names[node.module])
    op = node.grad_fn.name() if hasattr(node.grad_fn, "name") else type(node.module).__name__
    todo, seen = list(node.inputs), set()
    while todo and len(seen) < 100:
        before = todo.pop(0)
        if before.module in names:
            return f"{op} after {names[before.module]!r}"
        seen.add(before)
        todo.extend(n for n in before.inputs if n not in seen)
    return op


def _reason(blocked: dict[str, list[str]]) -> str | None:
    """One line: each blocking op once, with (up to three of) the layers that carry it."""
    parts = []
    for why, layers in blocked.items():
        shown = ", ".join(repr(n) for n in dict.fromkeys(layers[:3]))
        more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
        parts.append(f"{why} ({shown}{more})" if layers else why)
    return "; ".join(parts) or None


def _coupled(param: str, tensor: torch.Tensor, dim: int, item) -> Coupled:
    dim = dim % tensor.dim()
    return Coupled(param, dim, tuple(tensor.shape), torch.tensor(item.idxs, dtype=torch.long),
                   torch.tensor(item.root_idxs, dtype=torch.long))


def _why_blocked(module: nn.Module) -> str | None:
    for cls, why in _OPAQUE.items():
        if isinstance(module, cls):
            return why
    if isinstance(module, _ACROSS_CHANNELS):
        return (f"coupled to {type(module).__name__}, which normalises across channels, so masking "
                "cannot reproduce their removal")
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _depthwise(module):
        return f"coupled to a grouped conv (groups={module.groups}), whose filter-to-group layout removal would break"
    if not isinstance(module, _SUPPORTED):
        return f"coupled to a {type(module).__name__}, a layer type compaction does not support"
    return None


def _depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels > 1


def _dims(module: nn.Module, role: str) -> list[tuple[str, int]]:
    """``(parameter attribute, dim)`` that shrink when ``module`` loses channels on ``role``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if _depthwise(module):
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        out_dim = 1 if module.transposed else 0
        if role == "in":
            return [("weight", 1 - out_dim)]
        return [("weight", out_dim)] + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        if role == "in":
            return [("weight", 1)]
        return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    return [("weight", 0), ("bias", 0)] if getattr(module, "affine", False) else []
