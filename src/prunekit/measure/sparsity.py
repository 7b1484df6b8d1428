"""Sparsity that always states which tensors it covers (METHODS §0.2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.errors import UserError

COVERS = {"conv": (nn.Conv2d,), "conv+linear": (nn.Conv2d, nn.Linear), "linear": (nn.Linear,)}


@dataclass(frozen=True)
class Sparsity:
    zeros: int
    total: int
    covers: str
    first_conv_included: bool
    layers: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def describe(self) -> str:
        first = "first conv included" if self.first_conv_included else "first conv excluded"
        return f"{self.fraction:.2%} of {self.total:,} {self.covers} weights ({self.layers} layers, {first})"


def weight_sparsity(model: nn.Module, covers: str = "conv", include_first_conv: bool = True) -> Sparsity:
    """Fraction of exactly-zero weights over the layer types in ``covers`` (biases not counted)."""
    if covers not in COVERS:
        raise UserError(f"covers: expected one of {', '.join(COVERS)}, got {covers!r}")
    kinds = COVERS[covers]
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    if not include_first_conv:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        layers = [m for m in layers if m is not first_conv]
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return Sparsity(zeros=zeros, total=total, covers=covers, first_conv_included=include_first_conv,
                    layers=len(layers))
