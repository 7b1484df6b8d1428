"""Masks become a physically smaller module, through Torch-Pruning's dependency graph.

:func:`compact` removes whole channel groups (see :mod:`prunekit.core.groups`) in place, checks
that Torch-Pruning sliced exactly the tensors the groups name, re-binds an optimizer to the new
parameters with its state sliced alike, and checks that the compacted model computes what the
masked one did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.core.groups import ChannelGroup, channel_groups, dependency_graph, group_masks
from prunekit.core.manifest import Manifest
from prunekit.core.masks import MaskSet
from prunekit.errors import UserError

log = logging.getLogger(__name__)

Positions = dict[str, dict[int, torch.Tensor]]
"""Parameter name -> dim -> kept positions along it (in the dense coordinates)."""


class CompactionMismatch(RuntimeError):
    """The compacted model does not compute what the masked model did (a bug, not a user error)."""


@dataclass
class CompactionResult:
    model: nn.Module
    manifest: Manifest
    optimizer: torch.optim.Optimizer | None = None
    max_abs_diff: float | None = None
    """Largest |compacted - masked| output difference on the probe batch (None: not verified)."""


def compact(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor, *,
            optimizer: torch.optim.Optimizer | None = None, verify: bool = True,
            atol: float = 1e-4) -> CompactionResult:
    """Keep only the output channels ``keep[layer]`` of each named layer's channel group, in place.

    ``keep`` maps a Conv/Linear layer (ideally the group's root, see
    :func:`~prunekit.core.groups.channel_groups`) to the output-channel indices to keep; groups
    not named stay whole. ``optimizer`` (over the model's parameters) is re-bound to the new
    parameter objects, its per-entry state (momentum, Adam moments) sliced to the kept entries.
    With ``verify``, the model (eval mode, a seeded probe batch of 2 shaped like
    ``example_input``) must reproduce the masked model's output within ``atol`` (times the
    output scale when above 1), else :class:`CompactionMismatch` (the model is then left
    compacted). Groups that cannot be removed raise :class:`UserError` naming the blocking
    op and layer, before anything changes.
    """
    graph = dependency_graph(model, example_input)
    plan = _plan(channel_groups(model, example_input, graph=graph), keep)
    positions = _positions(plan)
    probe = _probe(example_input)
    reference = _masked_output(model, plan, probe) if verify else None
    before = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for group, kept in plan:
        root = modules[group.root]
        removed = sorted(set(range(group.channels)) - set(kept.tolist()))
        graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, removed).prune()
        log.debug("kept %d of %d channels of group %s", len(kept), group.channels, group.root)
    after = dict(model.named_parameters())
    _check_surgery(before, after, positions)
    if optimizer is not None:
        _rebind(optimizer, before, after, positions)
    diff = _verify(model, probe, reference, atol) if reference is not None else None
    manifest = Manifest({g.root: g.channels for g, _ in plan}, {g.root: tuple(k.tolist()) for g, k in plan})
    return CompactionResult(model, manifest, optimizer, diff)


def compact_masked(model: nn.Module, masks: MaskSet, example_input: torch.Tensor, *,
                   optimizer: torch.optim.Optimizer | None = None) -> CompactionResult:
    """Remove the filters a filter :class:`~prunekit.core.masks.MaskSet` pruned (the masks are
    applied and dropped first); see :func:`compact`."""
    keep = masks.keep_indices()
    masks.squash()
    return compact(model, keep, example_input, optimizer=optimizer)


def _plan(groups: list[ChannelGroup], keep: dict[str, torch.Tensor]) -> list[tuple[ChannelGroup, torch.Tensor]]:
    """The groups that lose channels, in module order, with their sorted kept indices.

    A group may be named by any layer whose output channels it holds (residual partners);
    naming several of them requires the same keep set.
    """
    owner = {layer: g for g in groups for layer in g.out_layers}
    wanted: dict[str, tuple[str, torch.Tensor]] = {}
    for name, kept in keep.items():
        if name not in owner:
            raise UserError(f"keep: {name!r} is not a Conv/Linear layer of the traced model")
        group = owner[name]
        kept = group.check_keep(kept)
        if group.root in wanted and not torch.equal(wanted[group.root][1], kept):
            raise UserError(f"keep: {wanted[group.root][0]!r} and {name!r} share their output channels "
                            "(one channel group) but were given different keep sets")
        wanted[group.root] = (name, kept)
    plan = []
    for group in groups:
        if group.root not in wanted or len(wanted[group.root][1]) == group.channels:
            continue
        name, kept = wanted[group.root]
        if group.blocked:
            raise UserError(f"cannot compact layer {name!r}: {group.blocked}")
        plan.append((group, kept))
    return plan


def _positions(plan: list[tuple[ChannelGroup, torch.Tensor]]) -> Positions:
    out: Positions = {}
    for group, kept in plan:
        for (param, dim), where in group.positions(kept).items():
            dims = out.setdefault(param, {})
            dims[dim] = where if dim not in dims else where[torch.isin(where, dims[dim])]
    return out


def _slice(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, where in dims.items():
        tensor = tensor.index_select(dim, where.to(tensor.device))
    return tensor


def _probe(example_input: torch.Tensor) -> torch.Tensor:
    """A seeded random batch of 2 shaped like one example (the example itself if not float)."""
    if not example_input.is_floating_point():
        return example_input
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *example_input.shape[1:]), generator=generator).to(example_input)


def _eval_output(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(probe)
    finally:
        for module, training in modes.items():
            module.training = training


def _masked_output(model: nn.Module, plan: list[tuple[ChannelGroup, torch.Tensor]],
                   probe: torch.Tensor) -> torch.Tensor:
    """The model's output with the plan's masks applied (the weights are restored afterwards)."""
    params = dict(model.named_parameters())
    masks = group_masks([g for g, _ in plan], {g.root: k for g, k in plan})
    saved = {name: params[name].detach().clone() for name in masks}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name].device))
        return _eval_output(model, probe)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _check_surgery(before: dict[str, nn.Parameter], after: dict[str, nn.Parameter], positions: Positions) -> None:
    """Torch-Pruning must have sliced exactly the tensors the groups name, exactly as they say."""
    if before.keys() != after.keys():
        raise CompactionMismatch("Torch-Pruning added or dropped parameters: "
                                 f"{sorted(before.keys() ^ after.keys())[:5]}")
    for name, new in after.items():
        expected = _slice(before[name].detach(), positions[name]) if name in positions else before[name].detach()
        if new.shape != expected.shape or not torch.equal(new.detach(), expected):
            raise CompactionMismatch(f"Torch-Pruning sliced {name!r} to {tuple(new.shape)}, the channel "
                                     f"groups expect {tuple(expected.shape)} (an op the graph misreads)")


def _rebind(optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter],
            after: dict[str, nn.Parameter], positions: Positions) -> None:
    """Point the optimizer at the new parameters; slice per-entry state (momentum, moments)."""
    name_of = {id(p): name for name, p in before.items()}
    for group in optimizer.param_groups:
        group["params"] = [after[name_of[id(p)]] if id(p) in name_of else p for p in group["params"]]
    for name, old in before.items():
        new = after[name]
        if new is old or old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: _slice(value, positions[name]) if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()
        }


def _verify(model: nn.Module, probe: torch.Tensor, reference: torch.Tensor, atol: float) -> float:
    output = _eval_output(model, probe)
    if output.shape != reference.shape:
        raise CompactionMismatch(f"compacted output shape {tuple(output.shape)} != masked {tuple(reference.shape)}")
    diff = (output - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    if not diff <= atol * scale:
        raise CompactionMismatch(f"the compacted model does not compute what the masked model did: max "
                                 f"|difference| {diff:.3g} > {atol:g} x output scale {scale:.3g}")
    log.info("compaction verified: max |compacted - masked| = %.3g", diff)
    return diff


def apply_manifest(model: nn.Module, manifest: Manifest, example_input: torch.Tensor) -> nn.Module:
    """Remove the manifest's channels from a dense ``model`` (in place); returns it.

    Only shapes matter here: load the compacted weights afterwards.
    """
    modules = dict(model.named_modules())
    for root, width in manifest.channels.items():
        layer = modules.get(root)
        if layer is None:
            raise UserError(f"manifest: names layer {root!r}, which this {type(model).__name__} does not have")
        dense = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if dense != width:
            raise UserError(f"manifest: layer {root!r} has {dense} output channels in this model, "
                            f"the manifest expects {width}")
    return compact(model, manifest.keep(), example_input, verify=False).model
