"""AutoBot's differentiable MACs (METHODS §4.3) by gate vector, for every gate placement.

:class:`GateCosts` wraps the per-layer cost table (:class:`~prunekit.core.costs.CostModel`),
which takes gate values keyed by channel-group root. The scatter placement
(:mod:`prunekit.core.gates`, ``residual="scatter"``) adds one vector per CIFAR basic block's
``conv2``, keyed by that conv's name, whose channels belong to the residual group but are
removed from ``conv2`` and ``bn2`` alone (:mod:`prunekit.core.scatter`). For those the table's
rows of ``conv2`` and ``bn2`` (counted at full output width) lose their MACs per removed output:
``(C − Σλ) · spatial · (ĉ_in / groups · k² + bias)`` and ``(C − Σλ) · 2 · spatial``, ĉ_in the soft
count of ``conv2``'s inputs (its block's ``conv1`` gate). With 0/1 gates :meth:`GateCosts.macs`
equals ``count_macs`` on the physically pruned model (scatter form included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.core.costs import CostModel, LayerCost
from prunekit.core.scatter import basic_blocks
from prunekit.errors import UserError


@dataclass(frozen=True)
class _Scattered:
    conv: LayerCost
    bn: LayerCost
    in_root: str | None  # the channel group feeding conv2 (None: its inputs are fixed)


class GateCosts:
    """Soft and hard MACs of a model for gate values keyed as :func:`~prunekit.core.gates.gate_values`."""

    def __init__(self, costs: CostModel, scattered: Mapping[str, _Scattered]) -> None:
        self.costs = costs
        self._scattered = dict(scattered)

    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor, *, scatter: bool = False) -> GateCosts:
        """The cost table of the (gate-free) ``model``; ``scatter``: its basic blocks' ``conv2`` are gated alone."""
        costs = CostModel.build(model, example_input)
        rows: dict[str, list[LayerCost]] = {}
        for layer in costs.layers:
            rows.setdefault(layer.name, []).append(layer)
        scattered = {}
        for block in basic_blocks(model) if scatter else ():
            conv, bn = (rows.get(f"{block}.{part}", []) for part in ("conv2", "bn2"))
            if len(conv) != 1 or len(bn) != 1 or len(conv[0].in_groups) > 1:
                raise UserError(f"residual: block {block!r} is not a plain basic block (one call of conv2 and "
                                "bn2, one channel group feeding conv2); use residual: keep")
            scattered[f"{block}.conv2"] = _Scattered(conv[0], bn[0], conv[0].in_groups[0] if conv[0].in_groups else None)
        return cls(costs, scattered)

    @property
    def scattered(self) -> tuple[str, ...]:
        """The ``conv2`` layers gated on their own (a name may also be the root of a residual group)."""
        return tuple(self._scattered)

    def dense_macs(self) -> int:
        return self.costs.dense_macs()

    def soft_macs(self, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """F(λ): a float64 scalar with gradients to the gates (values in [0, 1])."""
        total = self.costs.soft_macs({k: v for k, v in gates.items() if k not in self._scattered})
        for name, row in self._scattered.items():
            if name not in gates:
                continue
            gate = gates[name].cpu().to(torch.float64)
            if gate.shape != (row.conv.out_channels,):
                raise UserError(f"gates[{name!r}]: expected {row.conv.out_channels} values, got {tuple(gate.shape)}")
            inputs = (gates[row.in_root].cpu().to(torch.float64).sum() if row.in_root in gates
                      else torch.tensor(float(row.conv.in_channels), dtype=torch.float64))
            per_output = row.conv.spatial * (inputs / row.conv.groups * row.conv.kernel + row.conv.bias) * row.conv.calls
            per_output = per_output + row.bn.spatial * row.bn.kernel * row.bn.calls
            total = total - (row.conv.out_channels - gate.sum()) * per_output
        return total

    def macs(self, keep: Mapping[str, torch.Tensor]) -> int:
        """MACs once every vector keeps the channels its boolean mask marks (a :data:`~prunekit.core.targets.MacsOf`)."""
        return int(torch.round(self.soft_macs({k: torch.as_tensor(m).to(torch.float64) for k, m in keep.items()})))
