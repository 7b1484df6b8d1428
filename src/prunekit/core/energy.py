"""The pruned-energy penalty of Pruning On-the-Fly (METHODS §1.3.3).

For each penalised layer l at target sparsity s, with ŵ_l its effective weight (unit-norm
filters of an HSConv2d, unit-norm rows of a Linear):

* P_l: the ``k = ⌊s·n_l⌋`` entries of smallest |ŵ| (exact layer-wise top-k, ties: the higher
  index is in P, as in the pruning masks), recomputed at every call under ``no_grad``;
* ``E_{l,f} = Σ_{i ∈ P_{l,f}} ŵ_{l,f,i}²`` per output filter (∈ [0, 1]), ``R_l = mean_f E_{l,f}``;
* ``penalty = λ(t) · mean_l R_l``, differentiable through ŵ only (no gradient through P).

⌊s·n⌋ (the §1.3.3 definition, with a 1e-9 guard against float error) can be one below the
``n − round((1 − s)·n)`` entries that pruning at s zeros (§0.4), when s·n is not an integer.

Options: ``lam_ramp`` (fraction of training): λ(t) = λ·min(1, t/T_ramp) (0: no ramp; §1.3.3
suggests 0.1); ``sparsity`` is a number or a :class:`~prunekit.core.schedules.Schedule` s(p) of
training progress p (the optional sparsity ramp, e.g. ``build_schedule("linear", 0.5, end=0.5)``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from prunekit.core.hyperspherical import HSConv2d, effective_weight
from prunekit.core.schedules import Schedule
from prunekit.errors import UserError

_FLOAT_GUARD = 1e-9


def pruned_count(n: int, sparsity: float) -> int:
    """⌊s·n⌋, the number of entries the penalty targets in a layer of ``n``."""
    return math.floor(sparsity * n + _FLOAT_GUARD)


def low_magnitude_mask(values: torch.Tensor, pruned: int) -> torch.Tensor:
    """True at the ``pruned`` entries of smallest |value|, no gradient.

    Exactly the complement of :func:`~prunekit.core.selection.top_k_mask` keeping the rest (ties:
    the higher index is taken), with one sort instead of two: this runs at every training step.
    """
    with torch.no_grad():
        order = torch.sort(-values.detach().abs().flatten(), stable=True).indices
        mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
        mask[order[values.numel() - pruned:]] = True
        return mask.view(values.shape)


def filter_energies(unit_weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """E_f = Σ_{i ∈ P_f} ŵ_{f,i}², one per output filter (row)."""
    return (unit_weight.square() * pruned).flatten(1).sum(1)


def _is_fraction(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 <= value <= 1


def _fraction(name: str, value: object) -> float:
    if not _is_fraction(value):
        raise UserError(f"{name}: expected a fraction in [0, 1], got {value!r}")
    return float(value)


class PrunedEnergyPenalty:
    """λ(t)·mean_l mean_f E_{l,f} over ``layers`` (name → HSConv2d or Linear); see the module doc.

    Call it with the training progress p ∈ [0, 1] (completed fraction of the budget).
    """

    def __init__(self, layers: Mapping[str, nn.Module], lam: float = 1.0, sparsity: float | Schedule = 0.5,
                 lam_ramp: float = 0.0) -> None:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
            raise UserError(f"lam: expected a penalty weight λ >= 0, got {lam!r}")
        if isinstance(sparsity, Schedule):
            for bound in (sparsity.initial, sparsity.final):
                if not 0 <= bound < 1:
                    raise UserError(f"sparsity: expected the schedule to stay in [0, 1), it reaches {bound!r}")
        elif not _is_fraction(sparsity) or sparsity >= 1:
            raise UserError(f"sparsity: expected a fraction in [0, 1) (1 would penalise every entry), got {sparsity!r}")
        if not layers:
            raise UserError("layers: no layer to penalise")
        for name, layer in layers.items():
            if not isinstance(layer, (HSConv2d, nn.Linear)):
                raise UserError(f"layers: {name!r} is a {type(layer).__name__}; the penalty needs hyperspherical "
                                "convs (apply the 'hyperspherical' transform) or Linear layers")
        self.layers = dict(layers)
        self.lam = float(lam)
        self.sparsity = sparsity if isinstance(sparsity, Schedule) else float(sparsity)
        self.lam_ramp = _fraction("lam_ramp", lam_ramp)

    def lam_at(self, progress: float) -> float:
        """λ(t) = λ·min(1, p/lam_ramp) (λ when there is no ramp)."""
        if self.lam_ramp == 0:
            return self.lam
        return self.lam * min(1.0, progress / self.lam_ramp)

    def sparsity_at(self, progress: float) -> float:
        return self.sparsity(progress) if isinstance(self.sparsity, Schedule) else self.sparsity

    def __call__(self, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalty (a differentiable scalar) and R_l of every layer (detached, in ``layers``
        order, on the weights' device: no host sync per step; :meth:`by_layer` turns it into floats)."""
        progress = _fraction("progress", progress)
        sparsity = self.sparsity_at(progress)
        means = []
        for layer in self.layers.values():
            unit = effective_weight(layer)
            pruned = low_magnitude_mask(unit, pruned_count(unit.numel(), sparsity))
            means.append(filter_energies(unit, pruned).mean())
        energies = torch.stack(means)
        return self.lam_at(progress) * energies.mean(), energies.detach()

    def by_layer(self, energies: torch.Tensor) -> dict[str, float]:
        """Layer name → R_l from a call's (or a running sum's) energies tensor (one host sync)."""
        return dict(zip(self.layers, energies.tolist()))
