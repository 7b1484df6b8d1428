"""The Sparsifier: scores the units of chosen layers and keeps their masks at a target.

It composes the parts that each do one job: which layers (:mod:`prunekit.core.layers`), how
units are scored (:mod:`prunekit.core.importance`), a plan per target kind
(:mod:`prunekit.core.planning`) and the mask set with enforcement and state
(:mod:`prunekit.core.masks`). ``update(target)`` re-plans and applies; the Trainer hooks that
drive it during training live in :mod:`prunekit.train.masking`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from prunekit.core import planning
from prunekit.core.granularity import NM, Granularity
from prunekit.core.importance import Criterion, get_criterion, score_units
from prunekit.core.layers import PRUNABLE, select_layers
from prunekit.core.masks import MaskSet, RealisedSparsity
from prunekit.core.targets import MacsOf, Target
from prunekit.errors import UserError

log = logging.getLogger(__name__)

SCOPES = ("local", "global")


class Sparsifier:
    """Masks for the selected layers of ``model``, updated to targets.

    * ``granularity``: ``weight``, ``kernel``, ``filter``, ``channel`` or ``nm:N:M`` (see
      :mod:`prunekit.core.granularity`). ``criterion``: a name in ``CRITERIA`` or a function.
    * ``scope``: ``local`` (each layer at the asked sparsity) or ``global`` (one ranking across
      layers; ``normalize=True`` divides each layer's scores by their mean first).
    * ``layers``/``types``/``include_first_conv``/``include_classifier``: see
      :func:`~prunekit.core.layers.select_layers`.
    * ``overrides``: glob → sparsity, pinning matching layers at their own sparsity at every update.
    * ``monotone``: a pruned unit never comes back; ``False`` recomputes masks from current scores at
      each update (One-Cycle Pruning, METHODS §3.3).
    * ``round_to``: kept filter/channel counts rounded to a multiple (e.g. 8).
    * ``allow_empty``: allow a layer to lose all its filters/channels (refused otherwise).
    * ``seed``: for the ``random`` criterion. ``macs_of``: needed for ``macs=`` targets.
    """

    def __init__(self, model: nn.Module, granularity: str | Granularity = "weight",
                 criterion: str | Criterion = "l1", scope: str = "local", layers: str | Sequence[str] = "*", *,
                 types: tuple[type[nn.Module], ...] = PRUNABLE, include_first_conv: bool = True,
                 include_classifier: bool = False, overrides: Mapping[str, float] | None = None,
                 monotone: bool = True, normalize: bool = False, round_to: int | None = None,
                 allow_empty: bool = False, seed: int = 0, macs_of: MacsOf | None = None) -> None:
        if scope not in SCOPES:
            raise UserError(f"scope: expected local or global, got {scope!r}")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise UserError(f"round_to: expected an integer >= 1, got {round_to!r}")
        chosen = select_layers(model, layers, types, include_first_conv=include_first_conv,
                               include_classifier=include_classifier)
        if not chosen:
            raise UserError(f"layers: no {'/'.join(t.__name__ for t in types)} layer matches {layers!r}")
        self.mask_set = MaskSet(chosen, granularity)
        self.criterion = get_criterion(criterion)
        self.scope, self.monotone, self.normalize = scope, monotone, normalize
        self.round_to, self.allow_empty, self.macs_of = round_to, allow_empty, macs_of
        self.generator = torch.Generator().manual_seed(seed)
        self.overrides = self._resolve_overrides(overrides or {})
        log.debug("sparsifier over %d layers, %s/%s/%s", len(chosen), self.granularity, criterion, scope)

    @property
    def granularity(self) -> Granularity:
        return self.mask_set.granularity

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self.mask_set.layers

    def _resolve_overrides(self, overrides: Mapping[str, float]) -> dict[str, float]:
        if overrides and isinstance(self.granularity, NM):
            raise UserError(f"overrides: not supported with granularity {self.granularity}")
        resolved: dict[str, float] = {}
        for pattern, fraction in overrides.items():
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
                raise UserError(f"overrides: {pattern!r} expects a sparsity in [0, 1], got {fraction!r}")
            matched = [name for name in self.layers if fnmatchcase(name, pattern)]
            if not matched:
                raise UserError(f"overrides: {pattern!r} matches none of the pruned layers")
            for name in matched:
                resolved.setdefault(name, float(fraction))
        return resolved

    # ------------------------------------------------------------------ masks
    def masks(self) -> dict[str, torch.Tensor]:
        return self.mask_set.masks()

    def unit_masks(self) -> dict[str, torch.Tensor]:
        return self.mask_set.unit_masks()

    def couple_channels(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.mask_set.couple_channels(model, example_input)

    def plan(self, target: Target | str | float | None = None, *,
             evidence: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The unit masks (True = kept) that :meth:`update` would compute for ``target``; nothing changes."""
        kind, fraction = planning.goal(target, self.granularity, macs=self.macs_of is not None,
                                       overrides=bool(self.overrides))
        scores = self.scores(evidence)
        if kind == "nm":
            return planning.plan_nm(scores, self.granularity.n)
        if kind == "macs":
            return planning.plan_macs(scores, fraction, self.macs_of, scope=self.scope, round_to=self.round_to,
                                      normalize=self.normalize)
        return planning.plan_units(scores, fraction, scope=self.scope, overrides=self.overrides,
                                   round_to=self.round_to, normalize=self.normalize)

    def update(self, target: Target | str | float | None = None, *,
               evidence: Mapping[str, torch.Tensor] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
        """Recompute the masks for ``target`` and apply them (weights, gradients, optimizer state).

        ``evidence``: per-layer data for the taylor/movement/bn_scale criteria.
        """
        units = self.plan(target, evidence=evidence)
        new = {}
        for name, mask in self.masks().items():
            kept = self.granularity.expand(units[name], mask.shape)
            new[name] = kept & (mask > 0) if self.monotone else kept
            if self.granularity.structured and not self.allow_empty and not new[name].any():
                raise UserError(f"target: at {target} layer {name!r} would lose all its {self.granularity.name}s; "
                                "lower the target or exclude the layer")
        self.mask_set.assign(new, optimizer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("masks updated to %s: realised %.4f", target, self.realised_sparsity().total)

    def scores(self, evidence: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Unit scores of every layer; pruned units score ``-inf`` when ``monotone``."""
        alive = self.unit_masks() if self.monotone else None
        return score_units(self.layers, self.criterion, self.granularity, self.generator, evidence, alive)

    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.mask_set.enforce(optimizer)

    def realised_sparsity(self) -> RealisedSparsity:
        return self.mask_set.realised_sparsity()

    def squash(self) -> None:
        self.mask_set.squash()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {**self.mask_set.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.mask_set.load_state_dict(state)
