"""The kept channels of a compacted model, as JSON: enough to rebuild it from the dense one.

A compacted model is saved as its architecture name + this manifest + its weights. Loading
builds the dense architecture, removes the same channels
(:func:`prunekit.core.compaction.apply_manifest`), then loads the weights into the now matching
shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prunekit.errors import UserError

FORMAT = "prunekit.manifest/1"


@dataclass(frozen=True)
class Manifest:
    """Per channel-group root layer: its dense width and the output channels kept (sorted)."""

    channels: dict[str, int]
    kept: dict[str, tuple[int, ...]]

    def keep(self) -> dict[str, torch.Tensor]:
        """The ``keep`` argument of :func:`prunekit.core.compaction.compact`."""
        return {root: torch.tensor(kept, dtype=torch.long) for root, kept in self.kept.items()}

    def then(self, later: Manifest) -> Manifest:
        """The manifest of compacting with ``self`` and then with ``later`` (indices into the result)."""
        channels, kept = dict(self.channels), dict(self.kept)
        for root, again in later.kept.items():
            before = kept.get(root, tuple(range(later.channels[root])))
            if len(before) != later.channels[root]:
                raise UserError(f"manifest: {root!r} has {len(before)} channels, the later manifest "
                                f"expects {later.channels[root]}")
            channels.setdefault(root, later.channels[root])
            kept[root] = tuple(before[i] for i in again)
        return Manifest(channels, kept)

    def to_dict(self) -> dict[str, Any]:
        layers = {root: {"channels": self.channels[root], "width": len(kept), "kept": list(kept)}
                  for root, kept in self.kept.items()}
        return {"format": FORMAT, "layers": layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
            raise UserError(f"manifest: expected a {FORMAT!r} object with a 'layers' mapping")
        channels, kept = {}, {}
        for root, layer in data["layers"].items():
            try:
                width, indices = int(layer["channels"]), tuple(int(i) for i in layer["kept"])
            except (TypeError, KeyError, ValueError):
                raise UserError(f"manifest: layer {root!r} needs integer 'channels' and a 'kept' list") from None
            if not indices or sorted(set(indices)) != list(indices) or indices[-1] >= width or indices[0] < 0:
                raise UserError(f"manifest: layer {root!r}: 'kept' must be sorted distinct indices in [0, {width})")
            if layer.get("width", len(indices)) != len(indices):
                raise UserError(f"manifest: layer {root!r}: 'width' {layer['width']!r} contradicts the "
                                f"{len(indices)} kept channels")
            channels[root], kept[root] = width, indices
        return cls(channels, kept)

