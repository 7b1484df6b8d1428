"""How the weights of a layer group into prunable units (the thing one score ranks).

Every granularity works on a Conv weight ``[O, I, *kernel]`` (Conv2d: ``[O, I, kh, kw]``;
grouped/depthwise convs hold ``I = in_channels / groups``) and a Linear weight ``[O, I]``:

* ``weight``: every element is a unit (unstructured).
* ``kernel``: one unit per ``(o, i)`` pair, i.e. one ``kh × kw`` kernel (a Linear entry is a 1×1 kernel).
* ``filter``: one unit per output channel ``o`` (a Linear row).
* ``channel``: one unit per input channel ``i`` (weight dim 1; a Linear column).
* ``nm:N:M`` (``NM(n, m)``): N kept of every M consecutive weights **along the input dimension
  I**: for a conv weight ``[O, I, kh, kw]`` each group is ``w[o, g*M:(g+1)*M, y, x]`` for one
  ``(o, y, x)`` position; for Linear ``[O, I]`` it is ``w[o, g*M:(g+1)*M]``. ``I % M`` must be 0.
  Its units are single weights arranged as rows of M; selection keeps N per row.

``reduce`` sums an elementwise tensor (|w|, w², |w·g|, a mask) over each unit; ``expand`` turns
one boolean per unit back into a mask of the weight's shape.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import torch

from prunekit.errors import UserError
from prunekit.registry import Registry


class Granularity(ABC):
    """Maps a weight tensor to units and a unit mask back to a weight-shaped mask."""

    name: str
    structured: bool = False
    """True where removing every unit of a layer would delete the layer (filter, channel)."""

    def check(self, layer: str, shape: torch.Size) -> None:
        """Raise a UserError when ``shape`` cannot be split into this granularity's units."""
        if len(shape) < 2:
            raise UserError(f"granularity {self.name}: layer {layer!r} has a {len(shape)}-D weight; "
                            "expected a Conv or Linear weight [out, in, ...]")

    @abstractmethod
    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum weight-shaped ``values`` over each unit."""

    @abstractmethod
    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A view of ``unit_mask`` (shaped like ``reduce``'s output) broadcast to ``shape``."""

    def __repr__(self) -> str:
        return self.name


class Weight(Granularity):
    name = "weight"

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.flatten()

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_mask.view(shape)


class Kernel(Granularity):
    name = "kernel"

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.flatten(2).sum(2).flatten() if values.dim() > 2 else values.flatten()

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_mask.view(*shape[:2], *[1] * (len(shape) - 2)).expand(shape)


class Filter(Granularity):
    name = "filter"
    structured = True

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.flatten(1).sum(1)

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_mask.view(shape[0], *[1] * (len(shape) - 1)).expand(shape)


class Channel(Granularity):
    name = "channel"
    structured = True

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values.transpose(0, 1).flatten(1).sum(1)

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_mask.view(1, shape[1], *[1] * (len(shape) - 2)).expand(shape)


class NM(Granularity):
    """N kept of every M consecutive weights along the input dimension (see module doc)."""

    def __init__(self, n: int, m: int) -> None:
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
            raise UserError(f"granularity: expected N:M with integers 0 < N <= M, got {n}:{m}")
        self.n, self.m = n, m
        self.name = f"nm:{n}:{m}"

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def check(self, layer: str, shape: torch.Size) -> None:
        super().check(layer, shape)
        if shape[1] % self.m:
            raise UserError(f"granularity {self.name}: layer {layer!r} has {shape[1]} input channels, "
                            f"not a multiple of M={self.m}; exclude it (e.g. include_first_conv=False)")

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of M consecutive input-dim weights: shape ``[numel / M, M]``."""
        return values.movedim(1, -1).reshape(-1, self.m)

    def expand(self, unit_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        moved = (shape[0], *shape[2:], shape[1])
        return unit_mask.reshape(moved).movedim(-1, 1)


GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")
for _cls in (Weight, Kernel, Filter, Channel):
    GRANULARITIES.register(_cls.name)(_cls)

_NM_SPEC = re.compile(r"(?:nm:)?(\d+):(\d+)")


def get_granularity(spec: str | Granularity) -> Granularity:
    """A granularity by name (``weight``, ``kernel``, ``filter``, ``channel``, ``nm:2:4``/``2:4``)."""
    if isinstance(spec, Granularity):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"granularity: expected a name such as 'filter' or 'nm:2:4', got {spec!r}")
    match = _NM_SPEC.fullmatch(spec.strip())
    if match:
        return NM(int(match[1]), int(match[2]))
    try:
        return GRANULARITIES.get(spec.strip())()
    except UserError as err:
        raise UserError(f"{err}, or nm:N:M") from None
