"""Per-channel gates (AutoBot, METHODS §4.2): λ = sigmoid(α) multiplies a feature map channel-wise.

:func:`insert_gates` finds where the gates go and applies the registered transform ``"gates"``,
whose JSON arguments name every gated module, so replaying it on a fresh model of the same
architecture (see :mod:`prunekit.core.transforms`) needs no tracing and gives the same modules
and parameter names. A gated module is wrapped in :class:`Gated` (its parameters move from
``bn1.weight`` to ``bn1.module.weight`` while gated); :func:`remove_gates` puts the original
modules back, weights untouched, and drops the transform record.

Which channels: one gate vector per prunable channel group whose root is a conv (not blocked,
classifier outputs excluded; :func:`~prunekit.core.layers.filter_prunable_layers`; hidden Linear
layers are not gated), keyed by the group's root.
Channels tied by a residual addition share the group's one vector (``residual="coupled"``, the
paper's ResNet-50); ``"keep"`` leaves such groups ungated, so residual widths stay whole;
``"scatter"`` is ``"keep"`` plus a vector of its own for every CIFAR basic block's ``conv2``
(keyed by that conv's name), gated after ``bn2`` and before the addition, whose kept outputs
:mod:`prunekit.core.scatter` adds into the full-width residual. The CIFAR ResNets' stem feeds
the residual stream, so it is never gated there.

Where: after the norm layer that follows each conv producing the group's channels (after the
conv itself when no norm follows), except a producer whose channels only feed a depthwise conv
of the same group (MobileNetV2's expand conv): the depthwise conv's output is gated instead, so
consumers see each channel scaled once. The paper gates after the activation that follows
conv → BN. For ReLU that is the same for every λ ≥ 0 (relu(λz) = λ·relu(z)); for any
activation f with f(0) = 0 it is the same whenever λ ∈ {0, 1}, so the pseudo-pruned (0/1) model
is unchanged. Gating after the norm is chosen because norm layers belong to one conv while
activations are often one shared module (torchvision's ResNet block calls its ReLU twice) or a
functional call. Only ReLU6 (MobileNetV2, not in the official code) differs, for fractional λ:
min(max(λz, 0), 6) instead of λ·min(max(z, 0), 6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from prunekit.core.groups import ChannelGroup, _depthwise, channel_groups, dependency_graph
from prunekit.core.layers import filter_prunable_layers
from prunekit.core.scatter import basic_blocks
from prunekit.core.transforms import RECORD, apply_transform, recorded, register_transform
from prunekit.errors import UserError

log = logging.getLogger(__name__)

INIT = 0.9
"""Initial gate value of every channel (α = logit(0.9) ≈ 2.1972)."""
RESIDUAL = ("coupled", "keep", "scatter")
Residual = Literal["coupled", "keep", "scatter"]
TRANSFORM = "gates"


class ChannelGate(nn.Module):
    """λ = sigmoid(α), one per channel; multiplies dim 1 of its input. ``root`` names the vector."""

    def __init__(self, channels: int, root: str, init: float = INIT) -> None:
        super().__init__()
        self.root = root
        self.alpha = nn.Parameter(torch.full((channels,), math.log(init / (1 - init))))

    def value(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value().view(-1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()}, root={self.root!r}"


class Gated(nn.Module):
    """``gate(module(x))``: the wrapped module's output, gated channel-wise."""

    def __init__(self, module: nn.Module, gate: ChannelGate) -> None:
        super().__init__()
        self.module = module
        self.gate = gate

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.gate(self.module(*args, **kwargs))


def plan_gates(model: nn.Module, example_input: torch.Tensor, residual: Residual = "coupled") -> list[dict[str, Any]]:
    """The ``"gates"`` transform's arguments: ``[{"root", "channels", "after": [module names]}]``."""
    if residual not in RESIDUAL:
        raise UserError(f"residual: expected one of {', '.join(RESIDUAL)}, got {residual!r}")
    blocks = basic_blocks(model)
    if residual == "scatter" and not blocks:
        raise UserError("residual: 'scatter' needs a CIFAR ResNet (basic blocks conv1-bn1-relu1-conv2-bn2 "
                        "+ shortcut); this model has none")
    prunable = set(filter_prunable_layers(model, example_input))
    graph = dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    plan = []
    for group in channel_groups(model, example_input, graph=graph):
        if group.root not in prunable or not isinstance(model.get_submodule(group.root), nn.modules.conv._ConvNd):
            continue  # §4.2 gates the filters of convs: a hidden Linear (VGG's classifier) stays whole
        if residual != "coupled" and _residual(model, group):
            continue
        after = [_gated_output(graph, names, model.get_submodule(layer)) for layer in _gate_points(model, graph, group)]
        plan.append({"root": group.root, "channels": group.channels, "after": after})
    if residual == "scatter":
        for name, block in blocks.items():
            plan.append({"root": f"{name}.conv2", "channels": block.conv2.out_channels, "after": [f"{name}.bn2"]})
    log.info("gating %d channel groups (residual=%s)", len(plan), residual)
    return plan


def insert_gates(model: nn.Module, example_input: torch.Tensor, *, residual: Residual = "coupled",
                 init: float = INIT) -> nn.Module:
    """Insert gates at value ``init`` into ``model`` (in place, see the module doc); returns it."""
    return apply_transform(model, TRANSFORM, groups=plan_gates(model, example_input, residual), init=init)


@register_transform(TRANSFORM)
def _insert(model: nn.Module, groups: list[dict[str, Any]], init: float = INIT) -> nn.Module:
    if gates(model):
        raise UserError("gates: the model already has gates")
    if not 0 < init < 1:
        raise UserError(f"gates.init: expected a gate value in (0, 1), got {init!r}")
    for entry in groups:
        gate = ChannelGate(int(entry["channels"]), entry["root"], init)
        for name in entry["after"]:
            module = _submodule(model, name)
            width = next((getattr(module, a) for a in ("num_features", "out_channels", "out_features")
                          if hasattr(module, a)), None)
            if width != gate.alpha.numel():
                raise UserError(f"gates: {name!r} has {width} output channels, gate {gate.root!r} expects "
                                f"{gate.alpha.numel()}")
            _replace(model, name, Gated(module, gate))
    return model


def gates(model: nn.Module) -> dict[str, ChannelGate]:
    """The model's gate modules by root, in module order (a shared gate once)."""
    out: dict[str, ChannelGate] = {}
    for module in model.modules():
        if isinstance(module, ChannelGate):
            out.setdefault(module.root, module)
    return out


def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{root: λ}`` (detached copies)."""
    return {root: gate.value().detach().clone() for root, gate in gates(model).items()}


def set_gates(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Set gates to the values λ ∈ [0, 1] (exact 0/1 masks give exact 0/1 gates: α = ±inf)."""
    found = gates(model)
    for root, value in values.items():
        if root not in found:
            raise UserError(f"gates: {root!r} is not a gated group of this model")
        alpha = found[root].alpha
        value = torch.as_tensor(value).detach().to(alpha)
        if value.shape != alpha.shape or not bool(((value >= 0) & (value <= 1)).all()):
            raise UserError(f"gates[{root!r}]: expected {alpha.numel()} values in [0, 1]")
        with torch.no_grad():
            alpha.copy_(torch.logit(value))


def remove_gates(model: nn.Module) -> nn.Module:
    """Put the original modules back (weights untouched) and drop the ``"gates"`` record; returns ``model``."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, Gated)]
    if not wrapped:
        raise UserError("gates: the model has no gates to remove")
    for name in wrapped:
        _replace(model, name, model.get_submodule(name).module)
    setattr(model, RECORD, [entry for entry in recorded(model) if entry["name"] != TRANSFORM])
    return model


def _residual(model: nn.Module, group: ChannelGroup) -> bool:
    """Whether the group's channels are summed from several producers (a residual stream)."""
    return sum(not _depthwise_layer(model, layer) for layer in group.out_layers) > 1


def _depthwise_layer(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name)
    return isinstance(module, nn.modules.conv._ConvNd) and _depthwise(module)


def _gate_points(model: nn.Module, graph: tp.DependencyGraph, group: ChannelGroup) -> list[str]:
    """The group's producers whose outputs reach a consumer other than the group's depthwise convs."""
    depthwise = {model.get_submodule(n) for n in group.out_layers if _depthwise_layer(model, n)}
    return [n for n in group.out_layers if not _feeds_only(graph, model.get_submodule(n), depthwise)]


def _feeds_only(graph: tp.DependencyGraph, module: nn.Module, targets: set[nn.Module]) -> bool:
    """Whether every path from ``module`` reaches a Conv/Linear in ``targets`` (and no other end)."""
    stack, seen = list(graph.module2node[module].outputs), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
            if node.module not in targets:
                return False
        elif not node.outputs:
            return False
        else:
            stack.extend(node.outputs)
    return bool(seen)


def _gated_output(graph: tp.DependencyGraph, names: dict[nn.Module, str], module: nn.Module) -> str:
    """The norm layer that directly follows ``module`` (its only consumer), else ``module`` itself."""
    outputs = graph.module2node[module].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, nn.modules.batchnorm._BatchNorm):
        return names[outputs[0].module]
    return names[module]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(f"gates: the model has no module {name!r}") from None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
