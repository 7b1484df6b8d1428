"""Per-layer MAC costs as a table: the MACs of any keep-set without copying or re-tracing the model.

:meth:`CostModel.build` traces the model once (shapes only: convolutions and matrix products are
not computed) and records every layer the MAC counter counts (:mod:`prunekit.measure.macs`): its
channels, groups, kernel, output size, bias and calls, and which channel groups
(:mod:`prunekit.core.groups`) control each side. Removing root channels only lowers side
counts: a side keeps its dense positions minus those of the removed channels (several per
channel after a flatten; after a concatenation several groups share one side). Conv, linear and
affine-norm sides come from the groups' coupled parameters, the very positions compaction
slices; parameter-free layers (pools, norms without affine parameters) carry the channels of
their input, followed op by op through the forward pass. Whatever no removable group controls
is constant (METHODS §4.3's F_base). :meth:`CostModel.macs` equals ``count_macs`` on the
compacted model; :meth:`CostModel.soft_macs` is the same sum over gate values in [0, 1]
(AutoBot's differentiable MACs, METHODS §4.3, with the conv bias kept).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from prunekit.core.groups import ChannelGroup, channel_groups
from prunekit.errors import UserError
from prunekit.measure import macs as counter
from prunekit.tracing import probe_forward

log = logging.getLogger(__name__)

_Entries = tuple[Tensor, Tensor]
"""Positions along one side and the global index of the root channel each belongs to."""

_NO_ENTRIES: _Entries = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class LayerCost:
    """One counted layer, one row per distinct call (``calls`` identical calls merged).

    MACs per call are ``out_channels × spatial × (in_channels / groups × kernel + bias)`` when
    ``mixes`` (convs, linears: every input channel feeds every output), else
    ``out_channels × spatial × kernel`` (depthwise convs, whose groups shrink with their
    channels, with ``+ bias``; BN with kernel 2; adaptive pools with their window + 1; plain
    pools with 1). ``spatial`` is the output elements per output channel (the rows of a
    linear). ``out_groups``/``in_groups`` name the roots of the removable channel groups that
    control some of that side's positions (none: the side is fixed).
    """

    name: str
    type: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: float
    spatial: int
    bias: bool
    mixes: bool
    calls: int
    out_groups: tuple[str, ...]
    in_groups: tuple[str, ...]


@dataclass(eq=False)
class _Row:
    cost: LayerCost
    out: _Entries
    inp: _Entries = _NO_ENTRIES


class CostModel:
    """The MAC table of one model; see the module doc. Build it with :meth:`build`."""

    def __init__(self, groups: list[ChannelGroup], rows: list[_Row]) -> None:
        self.groups = groups
        self.layers = tuple(row.cost for row in rows)
        self._owner = {layer: g for g in groups for layer in g.out_layers}
        self._free = [g for g in groups if not g.blocked]
        sizes = [c.cost for c in rows]
        self._spatial = torch.tensor([c.spatial for c in sizes], dtype=torch.float64)
        self._kernel = torch.tensor([c.kernel for c in sizes], dtype=torch.float64)
        self._bias = torch.tensor([float(c.bias) for c in sizes], dtype=torch.float64)
        self._calls = torch.tensor([c.calls for c in sizes], dtype=torch.float64)
        self._groups = torch.tensor([c.groups if c.mixes else 1 for c in sizes], dtype=torch.float64)
        self._dense = torch.tensor([n for c in sizes for n in (c.out_channels, c.in_channels if c.mixes else 1)],
                                   dtype=torch.float64)
        sides = [(2 * i + side, entries) for i, row in enumerate(rows)
                 for side, entries in ((0, row.out), (1, row.inp))]
        self._slot = torch.cat([torch.full_like(pos, slot) for slot, (pos, _) in sides] or [_NO_ENTRIES[0]])
        self._channel = torch.cat([chan for _, (_, chan) in sides] or [_NO_ENTRIES[1]])
        self._dense_macs = self._total(self._per_call(torch.ones(sum(g.channels for g in self._free),
                                                                 dtype=torch.float64)))

    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor,
              groups: list[ChannelGroup] | None = None) -> CostModel:
        """Trace ``model`` once on ``example_input[:1]`` (batch 1, as ``count_macs`` counts).

        ``groups``: the model's channel groups from :func:`channel_groups` on the same input
        (built when None); groups left out, like blocked ones, are never removed.
        """
        groups = channel_groups(model, example_input) if groups is None else list(groups)
        free = [g for g in groups if not g.blocked]
        rows = _trace(model, example_input[:1], _coupled_sides(free), [g.root for g in free],
                      [g.channels for g in free])
        return cls(groups, rows)

    def dense_macs(self) -> int:
        """MACs of the whole model (= ``count_macs(model, example_input).total``)."""
        return self._dense_macs

    def macs(self, keep: Mapping[str, Tensor]) -> int:
        """MACs of the model compacted to ``keep``: a boolean mask (True kept) over the output
        channels of a group's root or a residual partner; groups not named stay whole."""
        return self._total(self._per_call(self._gate(keep, soft=False)))

    def soft_macs(self, gates: Mapping[str, Tensor]) -> Tensor:
        """:meth:`macs` with a float gate in [0, 1] per channel (a float64 scalar with gradients
        to the gates); equal to :meth:`macs` (up to float64 rounding) for 0/1 gates."""
        return (self._per_call(self._gate(gates, soft=True)) * self._calls).sum()

    # ------------------------------------------------------------------ internals
    def _per_call(self, gate: Tensor) -> Tensor:
        removed = torch.zeros_like(self._dense).index_add(0, self._slot, 1 - gate[self._channel])
        count = (self._dense - removed).view(-1, 2)
        return count[:, 0] * self._spatial * (count[:, 1] / self._groups * self._kernel + self._bias)

    def _total(self, per_call: Tensor) -> int:
        return int((torch.round(per_call) * self._calls).sum())

    def _gate(self, values: Mapping[str, Tensor], soft: bool) -> Tensor:
        """One gate per channel of every removable group, in group order (1 where not named)."""
        field_ = "gates" if soft else "keep"
        chosen: dict[str, tuple[str, Tensor]] = {}
        for name, value in values.items():
            group = self._owner.get(name)
            if group is None:
                raise UserError(f"{field_}: {name!r} is not a Conv/Linear layer of these channel groups")
            value = _checked(field_, name, value, group.channels, soft)
            if group.blocked and (soft or not bool(value.all())):
                raise UserError(f"cannot compact layer {name!r}: {group.blocked}")
            if group.root in chosen and not torch.equal(chosen[group.root][1], value):
                raise UserError(f"{field_}: {chosen[group.root][0]!r} and {name!r} share their output channels "
                                "(one channel group) but were given different values")
            chosen[group.root] = (name, value)
        pieces = [chosen[g.root][1].to(torch.float64) if g.root in chosen else torch.ones(g.channels, dtype=torch.float64)
                  for g in self._free]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)


def _checked(field_: str, name: str, value: Tensor, channels: int, soft: bool) -> Tensor:
    value = torch.as_tensor(value).cpu()
    kind = "a float gate" if soft else "a boolean mask"
    if value.shape != (channels,) or (value.is_floating_point() != soft) or (not soft and value.dtype != torch.bool):
        raise UserError(f"{field_}[{name!r}]: expected {kind} over its {channels} output channels, "
                        f"got {value.dtype} of shape {tuple(value.shape)}")
    if not soft and not bool(value.any()):
        raise UserError(f"{field_}[{name!r}]: would keep no channel")
    return value


# ---------------------------------------------------------------------- sides
def _coupled_sides(free: list[ChannelGroup]) -> dict[tuple[str, int], _Entries]:
    """``(parameter, dim)`` -> positions and global root-channel indices, from the groups' coupled data."""
    found: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
    offset = 0
    for group in free:
        for c in group.coupled:
            found.setdefault((c.param, c.dim), []).append((c.position, c.root_channel + offset))
        offset += group.channels
    out = {}
    for key, parts in found.items():
        pairs = torch.cat([pos * offset + chan for pos, chan in parts]).unique()  # each pair once
        pos, chan = pairs // offset, pairs % offset
        if pos.unique().numel() != pos.numel():
            raise RuntimeError(f"positions of {key} belong to several root channels; the cost table "
                               "assumes one (a bug in the channel groups)")
        out[key] = (pos, chan)
    return out


def _labels_of(entries: _Entries, channels: int) -> Tensor:
    labels = torch.full((channels,), -1, dtype=torch.long)
    labels[entries[0]] = entries[1]
    return labels


def _entries_of(labels: Tensor) -> _Entries:
    pos = (labels >= 0).nonzero().flatten()
    return pos, labels[pos]


# ---------------------------------------------------------------------- trace
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _trace(model: nn.Module, x: Tensor, sides: dict[tuple[str, int], _Entries], roots: list[str],
           sizes: list[int]) -> list[_Row]:
    """Rows of every counted call of one forward pass (see :class:`_ChannelLabels`)."""
    def side(name: str, dim: int) -> _Entries:
        return sides.get((f"{name}.weight" if name else "weight", dim), _NO_ENTRIES)

    modules = dict(model.named_modules())
    outputs = {name: _labels_of(side(name, 1 if m.transposed else 0), m.out_channels)
               if isinstance(m, nn.modules.conv._ConvNd) else _labels_of(side(name, 0), m.out_features)
               for name, m in modules.items() if isinstance(m, _LAYERS)}
    labels = _ChannelLabels()
    calls: list[tuple[LayerCost, int, Tensor | None]] = []

    def on_call(name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        rule = counter._rule(module)
        if rule is not None:
            calls.append((_cost(name, module, args[0], output), rule(module, args[0], output), labels.get(args[0])))
        if name in outputs:
            if output.dim() == 2 or isinstance(module, nn.modules.conv._ConvNd):
                labels.set(output, outputs[name])
            else:
                labels.drop(output)  # a linear over tokens: its channels are the last dim

    handles = [m.register_forward_hook(partial(on_call, name)) for name, m in modules.items()
               if name in outputs or counter._rule(m) is not None]
    if x.dim() >= 2:
        labels.set(x, torch.full((x.shape[1],), -1, dtype=torch.long))
    with labels:
        probe_forward(model, x, handles)
    rows: dict[str, list[_Row]] = {}
    starts = torch.tensor([0, *sizes]).cumsum(0)[:-1]
    for cost, dense, carried in calls:
        if _per_call(cost) != dense:
            raise RuntimeError(f"cost table row of {cost.name!r} gives {_per_call(cost)} MACs, the counter {dense}")
        out, inp = _sides(cost, modules[cost.name], carried, side)
        named = [tuple(roots[i] for i in sorted(set((torch.searchsorted(starts, chan, right=True) - 1).tolist())))
                 for _, chan in (out, inp)]
        _merge(rows.setdefault(cost.name, []), _Row(replace(cost, out_groups=named[0], in_groups=named[1]), out, inp))
    return [row for same_layer in rows.values() for row in same_layer]


def _cost(name: str, module: nn.Module, x: Tensor, y: Tensor) -> LayerCost:
    """The row of one call of a counted module, its channel groups not yet named (see :class:`LayerCost`)."""
    kind = counter._type_name(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels > 1
        return LayerCost(name, kind, module.in_channels, module.out_channels, module.groups,
                         math.prod(module.kernel_size), y.numel() // module.out_channels,
                         module.bias is not None, not depthwise, 1, (), ())
    if isinstance(module, nn.Linear):
        return LayerCost(name, kind, module.in_features, module.out_features, 1, 1,
                         y.numel() // module.out_features, False, True, 1, (), ())
    rule = counter._rule(module)
    if rule is counter._batchnorm_macs:
        kernel: float = 2
    elif rule is counter._avgpool_macs:
        kernel = 1
    elif rule is counter._adaptive_avgpool_macs:
        d = next(n for cls, n in counter._SPATIAL_DIMS.items() if isinstance(module, cls))
        kernel = math.prod(i / o for i, o in zip(x.shape[-d:], y.shape[-d:])) + 1
    else:
        raise RuntimeError(f"the cost table has no row for the MAC counter's rule on {kind} {name!r}")
    channels = y.shape[1]
    return LayerCost(name, kind, channels, channels, 1, kernel, y.numel() // channels, False, False, 1, (), ())


def _per_call(cost: LayerCost) -> int:
    """Dense MACs of one call (the formula of :class:`LayerCost`), to check against the counter."""
    per_output = cost.in_channels / cost.groups * cost.kernel if cost.mixes else cost.kernel
    return round(cost.out_channels * cost.spatial * (per_output + cost.bias))


def _sides(cost: LayerCost, module: nn.Module, carried: Tensor | None,
           side: Callable[[str, int], _Entries]) -> tuple[_Entries, _Entries]:
    """Who controls the output and input sides of one row."""
    if isinstance(module, _LAYERS):
        return side(cost.name, 0), (side(cost.name, 1) if cost.mixes else _NO_ENTRIES)
    if getattr(module, "weight", None) is not None:  # an affine norm: its coupled parameters say
        return side(cost.name, 0), _NO_ENTRIES
    if carried is None or carried.numel() != cost.out_channels:
        log.warning("cost table: cannot follow the channels into %s %r; its MACs are counted as fixed",
                    cost.type, cost.name)
        return _NO_ENTRIES, _NO_ENTRIES
    return _entries_of(carried), _NO_ENTRIES


def _merge(rows: list[_Row], row: _Row) -> None:
    """Append ``row`` to its layer's rows, or count one more call of an identical one."""
    for old in rows:
        if replace(old.cost, calls=0) == replace(row.cost, calls=0) and all(
                torch.equal(a, b) for a, b in zip((*old.out, *old.inp), (*row.out, *row.inp))):
            old.cost = replace(old.cost, calls=old.cost.calls + 1)
            return
    rows.append(row)


# ------------------------------------------------------------- channel labels
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MOVES_CHANNELS = {
    torch.transpose, Tensor.transpose, Tensor.transpose_, torch.permute, Tensor.permute, torch.swapaxes,
    Tensor.swapaxes, torch.swapdims, Tensor.swapdims, torch.movedim, Tensor.movedim, torch.moveaxis,
    Tensor.moveaxis, torch.t, Tensor.t, torch.pixel_shuffle, torch.pixel_unshuffle, torch.channel_shuffle,
    F.unfold, F.fold, Tensor.unfold, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, torch.bmm,
    torch.einsum, F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, torch.index_select, Tensor.index_select, torch.gather, Tensor.gather,
}
"""Ops whose output channels are not their input's (mixed, moved to another dim, or re-indexed)."""
_SHAPE_ONLY = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    F.bilinear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, torch.bmm, torch.einsum,
}
"""The costly ops: the trace gives zeros of their output's shape (found on the meta device)."""


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments of an op, also those one level inside a list or tuple (``torch.cat``)."""
    flat = [a for v in (*args, *kwargs.values()) for a in (v if isinstance(v, (tuple, list)) else (v,))]
    return [t for t in flat if isinstance(t, Tensor)]


def _zeros_like_output(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> Tensor:
    def meta(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(meta(v) for v in value)
        return value.to("meta") if isinstance(value, Tensor) else value

    shape = func(*meta(args), **{k: meta(v) for k, v in kwargs.items()})
    return torch.zeros(shape.shape, dtype=shape.dtype, device=_tensors(args, kwargs)[0].device)


class _ChannelLabels(TorchFunctionMode):
    """Follows, op by op, the global root channel each position along dim 1 carries (-1: none).

    Layers set the labels of their outputs; per-channel ops (activations, pools, norms,
    additions, pads of the spatial dims) pass their input's on, concatenations along the
    channels join them, slices and splits cut them, a flatten repeats each channel's label
    over its spatial positions. A label is found by id and checked against a weak reference,
    so a freed tensor's id cannot pass its labels on. The trace needs shapes, not values:
    convolutions and matrix products return zeros of their output's shape, so the pass costs
    only its element-wise ops (a forward whose control flow depends on values sees zeros).
    """

    def __init__(self) -> None:
        super().__init__()
        self._of: dict[int, tuple[weakref.ref, Tensor]] = {}

    def get(self, t: object) -> Tensor | None:
        entry = self._of.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def set(self, t: Tensor, labels: Tensor) -> None:
        self._of[id(t)] = (weakref.ref(t), labels)

    def drop(self, t: Tensor) -> None:
        self._of.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _zeros_like_output(func, args, kwargs) if func in _SHAPE_ONLY else func(*args, **kwargs)
        if func in _CAT:
            self._cat(args, kwargs, out)
        elif isinstance(out, (tuple, list)):
            self._split(args, kwargs, out)
        elif isinstance(out, Tensor) and out.dim() >= 2 and func not in _MOVES_CHANNELS:
            labels = self._index(args, out) if func is Tensor.__getitem__ else self._same(args, kwargs, out)
            if labels is not None:
                self.set(out, labels)
        return out

    def _sources(self, args: tuple, kwargs: dict) -> list[Tensor]:
        return [t for t in _tensors(args, kwargs) if self.get(t) is not None]

    def _same(self, args: tuple, kwargs: dict, out: Tensor) -> Tensor | None:
        for t in self._sources(args, kwargs):
            if t.dim() >= 2 and t.shape[:2] == out.shape[:2]:
                return self.get(t)
            if t.dim() > 2 and out.dim() == 2 and out.shape[0] == t.shape[0] and out.shape[1] == t.shape[1:].numel():
                return self.get(t).repeat_interleave(t.shape[2:].numel())  # a flatten: channel-major
        return None

    def _index(self, args: tuple, out: Tensor) -> Tensor | None:
        src, index = args[0], args[1]
        labels = self.get(src)
        index = index if isinstance(index, tuple) else (index,)
        if labels is None:
            return None
        if len(index) > 1 and isinstance(index[0], slice) and index[0] == slice(None):
            return labels[index[1]] if isinstance(index[1], slice) and out.dim() == src.dim() else None
        return labels if out.dim() == src.dim() and out.shape[:2] == src.shape[:2] else None

    def _cat(self, args: tuple, kwargs: dict, out: Tensor) -> None:
        tensors = args[0] if args else kwargs.get("tensors", ())
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        parts = [self.get(t) for t in tensors]
        if out.dim() < 2 or any(p is None for p in parts):
            return
        if dim % out.dim() == 1:
            self.set(out, torch.cat(parts))
        elif all(torch.equal(p, parts[0]) for p in parts):
            self.set(out, parts[0])

    def _split(self, args: tuple, kwargs: dict, out: tuple | list) -> None:
        sources = self._sources(args, kwargs)
        pieces = [t for t in out if isinstance(t, Tensor)]
        if not sources or len(pieces) != len(out):
            return
        src, labels = sources[0], self.get(sources[0])
        if any(t.dim() != src.dim() or t.dim() < 2 for t in pieces):
            return
        if all(t.shape[1] == src.shape[1] for t in pieces):
            for t in pieces:
                self.set(t, labels)
        elif sum(t.shape[1] for t in pieces) == src.shape[1] and all(
                t.shape[2:] == src.shape[2:] and t.shape[0] == src.shape[0] for t in pieces):
            for t, part in zip(pieces, labels.split([t.shape[1] for t in pieces])):
                self.set(t, part)
