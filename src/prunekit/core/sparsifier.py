"""The Sparsifier: owns the pruning masks of one model (create → update → enforce → squash).

Each pruned layer carries its mask as a non-persistent buffer ``weight_mask`` in the weight's
dtype, so the mask follows ``model.to(...)`` and ``copy.deepcopy``, the model's own state_dict
stays loadable into a plain model, and enforcing is one in-place ``mul_`` per tensor. The masks
travel in checkpoints through :meth:`Sparsifier.state_dict` (the :class:`EnforceMasks` hook hands
it to the Trainer). A Sparsifier built on a model that already carries masks (a deep copy) adopts
them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.core.granularity import NM, Filter, Granularity, get_granularity
from prunekit.core.importance import Criterion, LayerView, get_criterion
from prunekit.core.selection import global_masks, local_masks, nm_mask, normalise
from prunekit.core.targets import MacsOf, Target, bisect_macs, parse_target
from prunekit.errors import UserError
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import Trainer

log = logging.getLogger(__name__)

MASK = "weight_mask"
SCOPES = ("local", "global")


def select_layers(model: nn.Module, patterns: str | Sequence[str] = "*",
                  types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear), *,
                  include_first_conv: bool = True, include_classifier: bool = False) -> dict[str, nn.Module]:
    """Layers of ``types`` whose name matches a glob in ``patterns`` and no ``!``-prefixed glob.

    The first conv is the first ``nn.Conv2d`` in module order; the classifier is the last
    ``nn.Linear``. The defaults (first conv in, classifier out) are a starting point: each method
    sets them as its paper did (METHODS §0.2: OCP prunes every conv and no Linear, NPTM all convs
    but no FC, Pruning On-the-Fly everything but the first conv).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    keep = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    modules = list(model.named_modules())
    first_conv = next((m for _, m in modules if isinstance(m, nn.Conv2d)), None)
    classifier = next((m for _, m in reversed(modules) if isinstance(m, nn.Linear)), None)
    return {name: m for name, m in modules
            if isinstance(m, types)
            and any(fnmatchcase(name, p) for p in keep) and not any(fnmatchcase(name, p) for p in drop)
            and (include_first_conv or m is not first_conv)
            and (include_classifier or m is not classifier)}


@dataclass(frozen=True)
class RealisedSparsity:
    """Fraction of masked-out weights per layer and over all the sparsifier's layers."""

    per_layer: dict[str, float]
    total: float


class Sparsifier:
    """Masks for the selected layers of ``model``; see the module doc for where they live.

    * ``granularity``: ``weight``, ``kernel``, ``filter``, ``channel`` or ``nm:N:M`` (see
      :mod:`prunekit.core.granularity`). ``criterion``: a name in ``CRITERIA`` or a function.
    * ``scope``: ``local`` (each layer at the asked sparsity) or ``global`` (one ranking across
      layers; ``normalize=True`` divides each layer's scores by their mean first).
    * ``layers``/``types``/``include_first_conv``/``include_classifier``: see :func:`select_layers`.
    * ``overrides``: glob → sparsity, pinning matching layers at their own sparsity at every update.
    * ``monotone``: a pruned unit never comes back; ``False`` recomputes masks from current scores at
      each update (One-Cycle Pruning, METHODS §3.3).
    * ``round_to``: kept filter/channel counts rounded to a multiple (e.g. 8).
    * ``allow_empty``: allow a layer to lose all its filters/channels (refused otherwise).
    * ``seed``: for the ``random`` criterion. ``macs_of``: needed for ``macs=`` targets (see
      :mod:`prunekit.core.targets`).
    """

    def __init__(self, model: nn.Module, granularity: str | Granularity = "weight",
                 criterion: str | Criterion = "l1", scope: str = "local", layers: str | Sequence[str] = "*", *,
                 types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear), include_first_conv: bool = True,
                 include_classifier: bool = False, overrides: Mapping[str, float] | None = None,
                 monotone: bool = True, normalize: bool = False, round_to: int | None = None,
                 allow_empty: bool = False, seed: int = 0, macs_of: MacsOf | None = None) -> None:
        if scope not in SCOPES:
            raise UserError(f"scope: expected local or global, got {scope!r}")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise UserError(f"round_to: expected an integer >= 1, got {round_to!r}")
        self.granularity = get_granularity(granularity)
        self.criterion = get_criterion(criterion)
        self.scope, self.monotone, self.normalize = scope, monotone, normalize
        self.round_to, self.allow_empty, self.macs_of = round_to, allow_empty, macs_of
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = select_layers(model, layers, types, include_first_conv=include_first_conv,
                                    include_classifier=include_classifier)
        if not self.layers:
            raise UserError(f"layers: no {'/'.join(t.__name__ for t in types)} layer matches {layers!r}")
        for name, layer in self.layers.items():
            self.granularity.check(name, layer.weight.shape)
            _attach_mask(name, layer)
        self.overrides = self._resolve_overrides(overrides or {})
        self._groups: list = []  # channel groups whose coupled tensors are masked too (couple_channels)
        self._coupled: dict[nn.Parameter, torch.Tensor] = {}
        log.debug("sparsifier over %d layers, %s/%s/%s", len(self.layers), self.granularity, criterion, scope)

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

    def couple_channels(self, model: nn.Module, example_input: torch.Tensor) -> None:
        """Filter granularity: also mask every tensor coupled to a pruned filter.

        The coupled BN's weight and bias, the consumers' input channels, residual partners (from
        :mod:`prunekit.core.groups`) are masked and enforced with the filters, so a model trained
        under these masks computes exactly what its compacted version will.
        """
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

        keep = {name: kept.nonzero().flatten() for name, kept in self.unit_masks().items()}
        self._coupled = {self._params[name]: mask.to(self._params[name].device, self._params[name].dtype)
                         for name, mask in group_masks(self._groups, keep).items()}

    # ------------------------------------------------------------------ masks
    def masks(self) -> dict[str, torch.Tensor]:
        """The weight-shaped mask buffers (1 kept, 0 pruned), by layer name."""
        return {name: layer.get_buffer(MASK) for name, layer in self.layers.items()}

    def unit_masks(self) -> dict[str, torch.Tensor]:
        """One boolean per unit, True where kept (e.g. the kept filters, for compaction)."""
        return {name: self.granularity.reduce(mask) > 0 for name, mask in self.masks().items()}

    def plan(self, target: Target | str | float | None = None, *,
             evidence: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The unit masks (True = kept) that :meth:`update` would compute for ``target``; nothing changes.

        Lets a caller search over targets (e.g. a uniform ratio that meets a MACs budget) without
        touching the weights.
        """
        kind, fraction = self._goal(target)
        scores = self._scores(evidence)
        if kind == "nm":
            return {name: nm_mask(s, self.granularity.n) for name, s in scores.items()}
        if kind == "macs":
            return bisect_macs(self._ranked(scores), fraction, self.macs_of)
        units = local_masks({n: scores[n] for n in self.overrides}, self.overrides, self.round_to)
        free = {name: s for name, s in scores.items() if name not in self.overrides}
        if self.scope == "local":
            return units | local_masks(free, dict.fromkeys(free, fraction), self.round_to)
        return units | global_masks(self._ranked(free), fraction, self.round_to)

    def update(self, target: Target | str | float | None = None, *,
               evidence: Mapping[str, torch.Tensor] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
        """Recompute the masks for ``target`` and apply them (see :meth:`enforce`).

        ``target``: a float is the fraction of this granularity's units removed; ``weights=…``
        needs weight or kernel granularity (kernel: the fraction of kernels), ``filters=…`` filter
        or channel granularity, ``macs=…`` filter granularity and ``macs_of``. N:M needs none (or
        its own sparsity 1 − N/M). ``evidence``: per-layer data for taylor/movement/bn_scale.
        """
        units = self.plan(target, evidence=evidence)
        new = {}
        for name, mask in self.masks().items():
            kept = self.granularity.expand(units[name], mask.shape)
            new[name] = kept & (mask > 0) if self.monotone else kept
            if self.granularity.structured and not self.allow_empty and not new[name].any():
                raise UserError(f"sparsity: layer {name!r} would lose all its {self.granularity.name}s; "
                                "lower the sparsity, exclude the layer, or pass allow_empty=True")
        for name, mask in self.masks().items():
            mask.copy_(new[name])
        self._refresh_coupled()
        self.enforce(optimizer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("masks updated to %s: realised %.4f", target, self.realised_sparsity().total)

    def _goal(self, target: Target | str | float | None) -> tuple[str, float]:
        if isinstance(self.granularity, NM):
            if target is not None and abs(self._fraction(target, "weights") - self.granularity.sparsity) > 1e-9:
                raise UserError(f"target: granularity {self.granularity} fixes the sparsity at "
                                f"{self.granularity.sparsity:g}; got {target}")
            return "nm", self.granularity.sparsity
        if target is None:
            raise UserError("target: update needs a target such as 'weights=0.9' or a sparsity")
        if isinstance(target, (str, Target)) and parse_target(target).unit == "macs":
            if not isinstance(self.granularity, Filter) or self.macs_of is None or self.overrides:
                raise UserError("target: macs=… needs granularity 'filter', a macs_of counter and no overrides")
            return "macs", parse_target(target).fraction
        return "units", self._fraction(target, "filters" if self.granularity.structured else "weights")

    def _fraction(self, target: Target | str | float, unit: str) -> float:
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            if not 0 <= target <= 1:
                raise UserError(f"sparsity: expected a fraction in [0, 1], got {target!r}")
            return float(target)
        parsed = parse_target(target)
        if parsed.unit != unit:
            raise UserError(f"target: {parsed} does not fit granularity {self.granularity}; "
                            f"it prunes {unit}, use {unit}=…")
        return parsed.fraction

    def _scores(self, evidence: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            view = LayerView(name, layer.weight, None if evidence is None else evidence.get(name), self.generator)
            scores = self.criterion(view, self.granularity).float()
            alive = self.granularity.reduce(layer.get_buffer(MASK)) > 0
            if scores.shape != alive.shape:
                raise UserError(f"criterion: returned shape {tuple(scores.shape)} for layer {name!r}, "
                                f"expected {tuple(alive.shape)} (one score per {self.granularity.name})")
            out[name] = scores.masked_fill(~alive, float("-inf")) if self.monotone else scores
        return out

    def _ranked(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: normalise(s) for name, s in scores.items()} if self.normalize else scores

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

    def realised_sparsity(self) -> RealisedSparsity:
        """Pruned fraction of each layer's weights and of all of them together (from the masks)."""
        pruned = {name: int((mask == 0).sum()) for name, mask in self.masks().items()}
        sizes = {name: mask.numel() for name, mask in self.masks().items()}
        return RealisedSparsity({name: pruned[name] / sizes[name] for name in pruned},
                                sum(pruned.values()) / sum(sizes.values()))

    def squash(self) -> None:
        """Apply the masks for good and remove the buffers (before compaction or export)."""
        self.enforce()
        for layer in self.layers.values():
            del layer._buffers[MASK]
        self.layers, self._groups, self._coupled = {}, [], {}

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.to("cpu", torch.bool) for name, mask in self.masks().items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        masks = self.masks()
        if set(state["masks"]) != set(masks):
            raise UserError(f"masks: the saved layers {sorted(state['masks'])} differ from this "
                            f"sparsifier's {sorted(masks)}")
        for name, mask in masks.items():
            saved = state["masks"][name]
            if saved.shape != mask.shape:
                raise UserError(f"masks: layer {name!r} saved {tuple(saved.shape)}, model has {tuple(mask.shape)}")
            mask.copy_(saved)
        self.generator.set_state(state["generator"])
        self._refresh_coupled()
        self.enforce()


def _attach_mask(name: str, layer: nn.Module) -> None:
    if hasattr(layer, "weight_orig"):
        raise UserError(f"layers: {name!r} is pruned with torch.nn.utils.prune; call prune.remove on it first")
    mask = layer._buffers.get(MASK)
    if mask is None or mask.shape != layer.weight.shape:
        layer.register_buffer(MASK, torch.ones_like(layer.weight.detach()), persistent=False)


class EnforceMasks(Hook):
    """Trainer hook: enforce the masks (weights, gradients, optimizer state) after every step."""

    def __init__(self, sparsifier: Sparsifier) -> None:
        self.sparsifier = sparsifier

    def after_optimizer_step(self, trainer: Trainer) -> None:
        self.sparsifier.enforce(trainer.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsifier.load_state_dict(state)
