"""Recovery by mean replacement (METHODS §1.3.6): fill the pruned entries from their old values.

With P the pruned entries of a layer (mask False) and v the values before zeroing:

* ``layer_mean`` (default): every pruned entry ← μ_l = mean_{i∈P} v_i (signed);
* ``filter_mean``: a pruned entry of filter (row) f ← μ_{l,f} = mean of the pruned v of that filter;
* ``signed_abs_mean``: pruned entry i ← sign(v_i) · mean_{j∈P} |v_j| (sign(0) = 0: an entry that
  was exactly zero stays zero).

The values are the layer's stored weights (ŵ in a baked model; the classifier's plain weights),
so recover a *baked* model: an HSConv2d is refused. Kept entries are left as they are (possibly
fine-tuned). A recovered model is "mask + constant", neither dense nor sparse: it stores its kept
values, the mask and the constants (:class:`StorageCost`), and its compute equals the sparse one
plus μ·(conv(x, 𝟙) − conv(x, m)) per layer (one channel-summed box filter).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.core.hyperspherical import HSConv2d
from prunekit.errors import UserError

log = logging.getLogger(__name__)

MODES = ("layer_mean", "filter_mean", "signed_abs_mean")


@dataclass(frozen=True)
class StorageCost:
    """What a recovered layer stores: kept values and constants (floats), mask and sign bits."""

    kept: int
    constants: int
    mask_bits: int
    sign_bits: int

    def bits(self, float_bits: int = 32) -> int:
        return (self.kept + self.constants) * float_bits + self.mask_bits + self.sign_bits

    def __add__(self, other: StorageCost) -> StorageCost:
        return StorageCost(self.kept + other.kept, self.constants + other.constants,
                           self.mask_bits + other.mask_bits, self.sign_bits + other.sign_bits)


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"recovery: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def recovered(before: torch.Tensor, mask: torch.Tensor, mode: str = "layer_mean") -> torch.Tensor:
    """``before`` with its pruned entries (``mask`` False) replaced as ``mode`` says; kept ones unchanged."""
    _mode(mode)
    if before.shape != mask.shape:
        raise UserError(f"masks: expected a mask shaped {tuple(before.shape)}, got {tuple(mask.shape)}")
    pruned = ~mask.bool()
    if not pruned.any():
        return before.clone()
    if mode == "filter_mean":
        rows, hits = before.flatten(1), pruned.flatten(1)
        means = (rows * hits).sum(1) / hits.sum(1).clamp_min(1)
        fill = means.view(-1, *[1] * (before.dim() - 1)).expand_as(before)
    elif mode == "layer_mean":
        fill = before[pruned].mean().expand_as(before)
    else:
        fill = before.sign() * before[pruned].abs().mean()
    return torch.where(pruned, fill, before)


def storage_cost(mask: torch.Tensor, mode: str = "layer_mean") -> StorageCost:
    """Storage of one recovered layer: kept values, 1 constant (per filter for ``filter_mean``),
    1 mask bit per entry, and 1 sign bit per pruned entry for ``signed_abs_mean``."""
    _mode(mode)
    pruned = int((~mask.bool()).sum())
    return StorageCost(kept=mask.numel() - pruned, constants=mask.shape[0] if mode == "filter_mean" else 1,
                       mask_bits=mask.numel(), sign_bits=pruned if mode == "signed_abs_mean" else 0)


def recover(model: nn.Module, masks: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor],
            mode: str = "layer_mean") -> dict[str, StorageCost]:
    """Fill the pruned entries of every masked layer of ``model`` in place; returns each layer's cost.

    ``before``: the layers' weights before zeroing, by the same names as ``masks``.
    """
    _mode(mode)
    modules = dict(model.named_modules())
    costs = {}
    for name, mask in masks.items():
        layer = modules.get(name)
        if layer is None or name not in before:
            raise UserError(f"masks: {name!r} is not a layer of the model with its values before pruning")
        if isinstance(layer, HSConv2d):
            raise UserError(f"recovery: {name!r} is hyperspherical; bake the model first (bake_hyperspherical)")
        filled = recovered(before[name].to(layer.weight), mask.to(layer.weight.device), mode)
        with torch.no_grad():
            layer.weight.copy_(torch.where(mask.to(layer.weight.device).bool(), layer.weight, filled))
        costs[name] = storage_cost(mask, mode)
    log.info("recovery %s: %d layer(s) filled", mode, len(costs))
    return costs


def describe_cost(costs: Mapping[str, StorageCost], mode: str, float_bits: int = 32) -> str:
    """One line for reports, e.g. ``mask + constant (layer_mean): 1,200 kept + 20 constants …``."""
    total = sum(costs.values(), StorageCost(0, 0, 0, 0))
    dense = total.mask_bits * float_bits  # one float per entry (one mask bit per entry)
    signs = f" + {total.sign_bits:,} sign bits" if total.sign_bits else ""
    return (f"mask + constant ({mode}; neither dense nor sparse): {total.kept:,} kept values + "
            f"{total.constants:,} constants + {total.mask_bits:,} mask bits{signs} = "
            f"{total.bits(float_bits):,} bits vs {dense:,} dense ({float_bits}-bit floats)")
