"""Multiply-accumulate (MAC) counting with the thop convention (METHODS.md §0.1).

Counted module types (per call; a module called twice counts twice):

* ``nn.Conv1d/2d/3d``: ``out_elements × (C_in/groups × prod(kernel) + (1 if bias else 0))``.
* ``nn.Linear``: ``in_features × out_elements`` (bias not counted).
* ``nn.BatchNorm1d/2d/3d``: ``2 × elements``.
* ``nn.AdaptiveAvgPool1d/2d/3d``: ``(prod(in_spatial / out_spatial) + 1) × out_elements``
  (rounded to an integer when the sizes do not divide).
* ``nn.AvgPool1d/2d/3d``: ``1 × out_elements``.

Every other module (ReLU, ReLU6, MaxPool, Dropout, Identity, LayerNorm, GroupNorm,
ConvTranspose, custom modules such as the option-A ``PadShortcut``, ...) counts 0, and so do
functional ops called inside ``forward`` (``F.avg_pool2d``, additions, matmuls outside
``nn.Linear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import UserError
from prunekit.tracing import probe_forward

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_SPATIAL_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


@dataclass(frozen=True)
class MacRow:
    """MACs of one module over the profiled forward pass."""

    name: str
    type: str
    macs: int


@dataclass(frozen=True)
class MacReport:
    """Per-module MACs for a batch-1 forward pass, in module-definition order."""

    rows: tuple[MacRow, ...]

    @property
    def total(self) -> int:
        return sum(row.macs for row in self.rows)

    @property
    def by_type(self) -> dict[str, int]:
        """MACs summed per module type name (e.g. ``{"Conv2d": ..., "BatchNorm2d": ...}``)."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.type] = out.get(row.type, 0) + row.macs
        return out


def _conv_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    per_output = m.in_channels // m.groups * math.prod(m.kernel_size) + (m.bias is not None)
    return y.numel() * per_output


def _linear_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return m.in_features * y.numel()


def _batchnorm_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return 2 * y.numel()


def _adaptive_avgpool_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    d = next(n for cls, n in _SPATIAL_DIMS.items() if isinstance(m, cls))
    kernel = math.prod(i / o for i, o in zip(x.shape[-d:], y.shape[-d:]))
    return round((kernel + 1) * y.numel())


def _avgpool_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return y.numel()


_RULES: tuple[tuple[tuple[type[nn.Module], ...], Callable[..., int]], ...] = (
    (_CONV, _conv_macs),
    ((nn.Linear,), _linear_macs),
    (_BATCHNORM, _batchnorm_macs),
    (tuple(_SPATIAL_DIMS), _adaptive_avgpool_macs),
    (_AVGPOOL, _avgpool_macs),
)


def _rule(module: nn.Module) -> Callable[..., int] | None:
    for types, fn in _RULES:
        if isinstance(module, types):
            return fn
    return None


def _type_name(module: nn.Module) -> str:
    """Class name, seeing through ``torch.nn.utils.parametrize`` (``ParametrizedConv2d``)."""
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _example_input(
    model: nn.Module, input_shape: Sequence[int] | torch.Tensor, device: torch.device | str | None
) -> torch.Tensor:
    params = list(model.parameters()) + list(model.buffers())
    floats = [p for p in params if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if isinstance(input_shape, torch.Tensor):
        if input_shape.dim() == 0 or input_shape.shape[0] == 0:
            raise UserError("input_shape: expected an example tensor with a batch dimension")
        x = input_shape[:1].to(device)
        return x.to(dtype) if x.is_floating_point() else x
    shape = tuple(input_shape)
    if not shape or not all(type(s) is int and s > 0 for s in shape):
        raise UserError(
            "input_shape: expected positive ints without the batch dim, "
            f"e.g. (3, 32, 32); got {input_shape!r}"
        )
    return torch.zeros((1, *shape), dtype=dtype, device=device)


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int] | torch.Tensor = (3, 32, 32),
    *,
    device: torch.device | str | None = None,
) -> MacReport:
    """Count MACs of one forward pass at batch size 1 (thop convention, see module doc).

    ``input_shape`` is a shape without the batch dim, or an example batch (only its first
    sample is used). The input gets the dtype of the model's parameters and their device
    (or ``device``). The model runs in eval mode under ``torch.no_grad``; every module's
    training flag is restored afterwards.
    """
    x = _example_input(model, input_shape, device)
    macs: dict[str, int] = {}
    types: dict[str, str] = {}
    handles = []

    def make_hook(name: str, rule: Callable[..., int] | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            count = rule(module, args[0], output) if rule is not None else 0
            macs[name] = macs.get(name, 0) + count
            types[name] = _type_name(module)

        return hook

    for name, module in model.named_modules():
        rule = _rule(module)
        if rule is not None or next(module.children(), None) is None:
            handles.append(module.register_forward_hook(make_hook(name, rule)))
    probe_forward(model, x, handles)
    order = [name for name, _ in model.named_modules() if name in macs]
    return MacReport(tuple(MacRow(name, types[name], macs[name]) for name in order))
