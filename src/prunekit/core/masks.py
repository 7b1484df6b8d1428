"""The mask set of one model: weight-shaped masks on named layers, enforced, saved, squashed.

Each masked layer carries its mask as a non-persistent buffer ``weight_mask`` in the weight's
dtype, so the mask follows ``model.to(...)`` and ``copy.deepcopy``, the model's own state_dict
stays loadable into a plain model, and enforcing is one in-place ``mul_`` per tensor. With
filter masks, :meth:`MaskSet.couple_channels` also masks every tensor coupled to a pruned
filter (BN affine, consumers' input channels, residual partners), so the masked model
computes exactly what its compacted form will.

This module owns the mask file format: ``masks.safetensors`` holds one weight-shaped uint8
mask per layer name, with the granularity in its metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.core.granularity import Filter, Granularity, get_granularity
from prunekit.core.layers import require_layers
from prunekit.errors import UserError
from prunekit.io import atomic_path

log = logging.getLogger(__name__)

MASK = "weight_mask"
FORMAT = "prunekit.masks/1"


@dataclass(frozen=True)
class RealisedSparsity:
    """Fraction of masked-out weights per layer and over all the mask set's layers."""

    per_layer: dict[str, float]
    total: float


class MaskSet:
    """Masks of the ``layers`` of one model at one ``granularity`` (all ones when first attached)."""

    def __init__(self, layers: Mapping[str, nn.Module], granularity: str | Granularity = "weight") -> None:
        if not layers:
            raise UserError("layers: a mask set needs at least one Conv/Linear layer")
        self.granularity = get_granularity(granularity)
        self.layers = dict(layers)
        for name, layer in self.layers.items():
            self.granularity.check(name, layer.weight.shape)
            _attach(name, layer)
        self._groups: list = []
        self._params: dict[str, nn.Parameter] = {}
        self._coupled: dict[nn.Parameter, torch.Tensor] = {}

    @classmethod
    def attach(cls, model: nn.Module, masks: Mapping[str, torch.Tensor], granularity: str | Granularity = "weight",
               example_input: torch.Tensor | None = None) -> MaskSet:
        """Put saved weight-shaped masks (True/1 kept) on ``model`` and enforce them.

        Filter masks with ``example_input`` are coupled (see the module doc)."""
        masks_set = cls(require_layers(model, sorted(masks)), granularity)
        masks_set.assign({name: torch.as_tensor(m).bool() for name, m in masks.items()})
        if example_input is not None and isinstance(masks_set.granularity, Filter):
            masks_set.couple_channels(model, example_input)
        return masks_set

    # ------------------------------------------------------------------ views
    @property
    def structured(self) -> bool:
        return self.granularity.structured

    @property
    def coupled(self) -> bool:
        """True once :meth:`couple_channels` masks the tensors coupled to the filters."""
        return bool(self._groups)

    def masks(self) -> dict[str, torch.Tensor]:
        """The weight-shaped mask buffers (1 kept, 0 pruned), by layer name."""
        return {name: layer.get_buffer(MASK) for name, layer in self.layers.items()}

    def unit_masks(self) -> dict[str, torch.Tensor]:
        """One boolean per unit, True where kept (e.g. the kept filters)."""
        return {name: self.granularity.reduce(mask) > 0 for name, mask in self.masks().items()}

    def keep_indices(self) -> dict[str, torch.Tensor]:
        """Kept output channels per layer, for :func:`prunekit.core.compaction.compact` (filter masks only)."""
        if not isinstance(self.granularity, Filter):
            raise UserError(f"granularity: only filter masks can be compacted, these are {self.granularity} "
                            "masks (their zeros stay in place; use granularity filter to remove channels)")
        return {name: kept.nonzero().flatten() for name, kept in self.unit_masks().items()}

    def checksum(self) -> torch.Tensor:
        """Per layer (in name order): kept count and a position-weighted sum of the mask, as
        float64; equal masks give equal checksums (what ranks compare under torchrun)."""
        sums = []
        for _, mask in sorted(self.masks().items()):
            flat = mask.detach().flatten().double()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) % 1_000_003
            sums += [flat.sum(), (flat * weights).sum()]
        return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)

    def realised_sparsity(self) -> RealisedSparsity:
        """Pruned fraction of each layer's weights and of all of them together."""
        pruned = {name: int((mask == 0).sum()) for name, mask in self.masks().items()}
        sizes = {name: mask.numel() for name, mask in self.masks().items()}
        return RealisedSparsity({name: pruned[name] / sizes[name] for name in pruned},
                                sum(pruned.values()) / sum(sizes.values()))

    # ---------------------------------------------------------------- changes
    def assign(self, new: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Replace the masks with weight-shaped booleans (True kept), then enforce them."""
        for name, mask in self.masks().items():
            if tuple(new[name].shape) != tuple(mask.shape):
                raise UserError(f"masks: layer {name!r} got shape {tuple(new[name].shape)}, its weight is "
                                f"{tuple(mask.shape)}")
            mask.copy_(new[name])
        self._refresh_coupled()
        self.enforce(optimizer)

    def couple_channels(self, model: nn.Module, example_input: torch.Tensor) -> None:
        """Filter masks: also mask every tensor coupled to a pruned filter (channel groups)."""
        if not isinstance(self.granularity, Filter):
            raise UserError(f"couple_channels: needs granularity 'filter', not {self.granularity}")
        from prunekit.core.groups import channel_groups  # Torch-Pruning only when asked for

        self._groups = channel_groups(model, example_input, list(self.layers))
        self._params = dict(model.named_parameters())
        self._refresh_coupled()
        self.enforce()

    def _refresh_coupled(self) -> None:
        if not self._groups:
            return
        from prunekit.core.groups import group_masks

        self._coupled = {self._params[name]: mask.to(self._params[name].device, self._params[name].dtype)
                         for name, mask in group_masks(self._groups, self.keep_indices()).items()}

    # -------------------------------------------------------------- hot path
    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights, their gradients and every optimizer state tensor shaped like them
        (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, ...). Call after each step."""
        pairs = [(layer.weight, layer._buffers[MASK]) for layer in self.layers.values()]
        if any(mask.device != param.device for param, mask in self._coupled.items()):  # the model moved
            self._coupled = {param: mask.to(param.device) for param, mask in self._coupled.items()}
        with torch.no_grad():
            for param, mask in [*pairs, *self._coupled.items()]:
                param.mul_(mask)
                if param.grad is not None:
                    param.grad.mul_(mask)
                state = optimizer.state.get(param) if optimizer is not None else None
                if state:
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            value.mul_(mask)

    def squash(self) -> None:
        """Apply the masks for good and remove the buffers (before compaction or export)."""
        self.enforce()
        for layer in self.layers.values():
            del layer._buffers[MASK]
        self.layers, self._groups, self._coupled = {}, [], {}

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.to("cpu", torch.bool) for name, mask in self.masks().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        masks = self.masks()
        if set(state["masks"]) != set(masks):
            raise UserError(f"masks: the saved layers {sorted(state['masks'])} differ from this "
                            f"mask set's {sorted(masks)}")
        self.assign(state["masks"])

    def save(self, path: str | Path) -> None:
        """Write the masks (weight-shaped uint8) and the granularity, atomically."""
        tensors = {n: m.detach().to("cpu", torch.uint8).contiguous() for n, m in self.masks().items()}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "granularity": self.granularity.name})


def read_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weight-shaped boolean masks and the granularity name saved by :meth:`MaskSet.save`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        masks = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"masks: cannot read {str(path)!r} ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"masks: {str(path)!r} is not a {FORMAT} file")
    return {name: mask.bool() for name, mask in masks.items()}, metadata.get("granularity", "weight")


def _attach(name: str, layer: nn.Module) -> None:
    if hasattr(layer, "weight_orig"):
        raise UserError(f"layers: {name!r} is pruned with torch.nn.utils.prune; call prune.remove on it first")
    mask = layer._buffers.get(MASK)
    if mask is None or mask.shape != layer.weight.shape:
        layer.register_buffer(MASK, torch.ones_like(layer.weight.detach()), persistent=False)
