"""Pruning methods a recipe can name in ``prune.method``: each is its own schema + its prune stage.

A method is a :class:`PruneSpec` subclass registered in :data:`PRUNE_METHODS`. Its fields are
the ``prune`` section's keys (unknown keys are errors), its validators check them, and
:meth:`PruneSpec.run` performs the prune stage: read the model the previous stage left,
prune it, write the pruned model (+ masks) into the stage directory, return a summary.
Later methods (hyperspherical, AutoBot, retraining variants) register the same way::

    @PRUNE_METHODS.register("autobot")
    class AutoBotPrune(PruneSpec):
        method: Literal["autobot"]
        ...
        def run(self, ctx, source, out): ...

Built in: ``oneshot`` (prune once to the target, then optionally retrain), ``filter_config``
(one-shot filter pruning with a predefined per-layer configuration, Network Pruning That Matters)
and ``gradual`` (prune along a sparsity schedule while training,
:class:`~prunekit.methods.gradual.GradualPruning`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from prunekit.core.granularity import NM, get_granularity
from prunekit.core.importance import CRITERIA
from prunekit.core.schedules import SCHEDULES, Schedule, build_schedule
from prunekit.core.targets import Target, parse_target
from prunekit.errors import UserError
from prunekit.experiment.schema import Fraction, PositiveInt, Section, TrainSpec, reword
from prunekit.registry import Registry

if TYPE_CHECKING:
    from prunekit.experiment.stages import StageContext

log = logging.getLogger(__name__)

PRUNE_METHODS: Registry[type["PruneSpec"]] = Registry("pruning method")

RECIPE_CRITERIA = ("l1", "l2", "random")
"""Criteria that need no data evidence; taylor/movement/bn_scale need a method that gathers it."""

UNIT_GRANULARITY = {"weights": "weight", "filters": "filter", "macs": "filter"}


class PruneSpec(Section):
    """Keys every pruning method shares. ``target`` names its unit; the number is the fraction removed."""

    method: str
    target: str
    granularity: str | None = None
    criterion: str = "l1"
    scope: Literal["local", "global"] = "local"
    layers: list[str] = Field(default_factory=lambda: ["*"])
    include_first_conv: bool = True
    include_classifier: bool = False
    round_to: PositiveInt | None = None

    @field_validator("target", mode="before")
    @classmethod
    def _parse_target(cls, value: Any) -> str | None:
        if value is None:  # a method without a target (its resolved recipe says target: null)
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = f"{value / 100:g}" if 1 < value <= 100 else f"{value:g}"
            raise ValueError(f"needs a unit: write weights={hint}, filters={hint} or macs={hint} "
                             "(the fraction removed)")
        try:
            return str(parse_target(value))
        except UserError as exc:
            raise ValueError(reword(str(exc), "target")) from None

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, name: str) -> str:
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA.names())}")
        if name not in RECIPE_CRITERIA:
            raise ValueError(f"{name} needs data evidence, which no recipe method gathers yet; "
                             f"use {', '.join(RECIPE_CRITERIA)}")
        return name

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, patterns: list[str]) -> list[str]:
        if not patterns:
            raise ValueError("expected at least one glob such as '*' (prefix with ! to exclude)")
        return patterns

    @model_validator(mode="after")
    def _granularity_fits_target(self) -> PruneSpec:
        self.check_target()
        return self

    def check_target(self) -> None:
        """Raise ValueError (``key: problem``) when target, granularity and layers do not fit together.

        A method overrides this rather than the validator: the recipe re-runs the base class's
        validators on a method's instance."""
        target = self.parsed_target
        if self.granularity is None:
            self.granularity = UNIT_GRANULARITY[target.unit]
        try:
            granularity = get_granularity(self.granularity)
        except UserError as exc:
            raise ValueError(f"granularity: {reword(str(exc), 'granularity')}") from None
        self.granularity = granularity.name
        if target.unit == "weights" and granularity.structured:
            raise ValueError(f"target: {target} does not fit granularity {granularity}, which removes whole "
                             f"{granularity.name}s; write filters=… (or macs=…)")
        if target.unit in ("filters", "macs") and not granularity.structured:
            raise ValueError(f"target: {target} needs granularity filter; granularity {granularity} prunes "
                             "single weights, write weights=…")
        if isinstance(granularity, NM) and abs(target.fraction - granularity.sparsity) > 1e-9:
            raise ValueError(f"target: granularity {granularity} fixes the sparsity at {granularity.sparsity:g}; "
                             f"write weights={granularity.sparsity:g}")
        if self.round_to is not None and not granularity.structured:
            raise ValueError("round_to: applies to filter pruning only (kept filters per layer a multiple of N)")
        if granularity.structured and (self.layers != ["*"] or not self.include_first_conv or self.include_classifier):
            raise ValueError("layers: filter pruning picks the removable channel groups itself (classifier "
                             "outputs excluded); layers / include_first_conv / include_classifier apply to "
                             "weight, kernel and N:M granularity")

    # ----------------------------------------------------------------- queries
    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target)

    @property
    def label(self) -> str:
        """What the method removes, for the results store, tables and plots."""
        return self.target

    @property
    def structured(self) -> bool:
        return get_granularity(self.granularity).structured

    def phase(self) -> TrainSpec | None:
        """The training this method does inside its prune stage (None: it does not train)."""
        return None

    def sparsity_schedule(self) -> Schedule | None:
        """The target sparsity over the prune stage's training, for methods that have one."""
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Change a freshly built model before any training (e.g. swap in special layers)."""
        return model

    def sparsifier_kwargs(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "criterion": self.criterion, "scope": self.scope,
                "layers": self.layers, "include_first_conv": self.include_first_conv,
                "include_classifier": self.include_classifier}

    def run(self, ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
        """Prune the model of ``source`` (None: a freshly initialised one) into ``out``; a summary."""
        raise NotImplementedError


@PRUNE_METHODS.register("oneshot")
class OneShotPrune(PruneSpec):
    """Prune once to the target (magnitude or random scores); filter pruning compacts right away
    when the recipe's ``compact`` is true, so retraining runs on the smaller model."""

    method: Literal["oneshot"]

    @model_validator(mode="after")
    def _supported(self) -> OneShotPrune:
        if self.granularity == "channel":
            raise ValueError("granularity: channel pruning is not available to recipes yet; use filter")
        return self

    def run(self, ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
        from prunekit.core.oneshot import prune_once
        from prunekit.core.sparsifier import Sparsifier

        model, spec = ctx.load_model(source) if source is not None else ctx.fresh_model()
        before = ctx.measure(model)
        manifest, masks = None, None
        if self.structured:
            result = prune_once(model, ctx.example_input(), target=self.target, granularity=self.granularity,
                                criterion=self.criterion, scope=self.scope, round_to=self.round_to,
                                compact_model=ctx.recipe.compact, seed=ctx.seed)
            if result.compaction is not None:
                manifest = result.compaction.manifest
                realised = 1 - sum(len(k) for k in manifest.kept.values()) / sum(manifest.channels.values())
            else:
                masks = result.sparsifier.masks()
                realised = result.sparsifier.realised_sparsity().total
        else:
            sparsifier = Sparsifier(model, seed=ctx.seed, **self.sparsifier_kwargs())
            sparsifier.update(self.target)
            masks, realised = sparsifier.masks(), sparsifier.realised_sparsity().total
        ctx.save_model(model, spec, out, masks=masks, manifest=manifest, granularity=self.granularity)
        after = ctx.measure(model)
        return {"target": self.target, "granularity": self.granularity, "realised_sparsity": realised,
                "realised_covers": "filters of the pruned groups" if manifest is not None else
                                   "weights of the pruned layers",
                "compacted": manifest is not None, "macs_before": before["macs"], "macs_after": after["macs"],
                "params_before": before["params"], "params_after": after["params"],
                "test_acc_after_prune": ctx.test_accuracy(model)}


@PRUNE_METHODS.register("filter_config")
class FilterConfigPrune(PruneSpec):
    """One-shot filter pruning with a predefined per-layer configuration (METHODS §2.3.1, as
    Network Pruning That Matters ran it): ``config`` names one of ``FILTER_CONFIGS`` (ResNet-56/110
    A–D, VGG-16 A–C, the [PROPOSED] ``resnet20-B``); ``criterion: l1`` keeps the filters with the
    largest L1 norms, ``random`` the same number per layer chosen at random (seeded by the run's
    seed). The configuration fixes how much goes, so there is no ``target``. With ``compact: true``
    the filters are removed at once; otherwise they are masked (with their BN and consumer inputs).
    """

    method: Literal["filter_config"]
    config: str
    target: str | None = None
    granularity: str | None = "filter"

    @field_validator("config")
    @classmethod
    def _known_config(cls, name: str) -> str:
        from prunekit.methods.filter_configs import FILTER_CONFIGS

        if name not in FILTER_CONFIGS:
            raise ValueError(f"unknown filter-pruning configuration {name!r}; known: {', '.join(FILTER_CONFIGS.names())}")
        return name

    def check_target(self) -> None:
        if self.target is not None:
            raise ValueError(f"target: the configuration {self.config!r} fixes what is removed; drop target")
        if self.granularity != "filter":
            raise ValueError(f"granularity: filter_config removes whole filters; expected filter, got {self.granularity!r}")
        for key in ("scope", "round_to", "layers", "include_first_conv", "include_classifier"):
            if getattr(self, key) != PruneSpec.model_fields[key].get_default(call_default_factory=True):
                raise ValueError(f"{key}: the configuration {self.config!r} fixes the pruned layers and counts; drop {key}")

    @property
    def structured(self) -> bool:
        return True

    @property
    def label(self) -> str:
        return f"config={self.config} ({self.criterion})"

    def run(self, ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
        from prunekit.methods.filter_configs import filter_keep

        model, spec = ctx.load_model(source) if source is not None else ctx.fresh_model()
        before = ctx.measure(model)
        keep = filter_keep(model, self.config, self.criterion, seed=ctx.seed)
        removed = sum(m.out_channels - len(keep[n]) for n, m in model.named_modules() if n in keep)
        manifest, masks = None, None
        if ctx.recipe.compact:
            from prunekit.core.compaction import compact

            result = compact(model, keep, ctx.example_input())
            model, manifest = result.model, result.manifest
        else:
            from prunekit.experiment.stages import attach_masks
            from prunekit.methods.filter_configs import keep_masks

            masks = keep_masks(model, keep)
            attach_masks(model, masks, ctx.example_input())
        ctx.save_model(model, spec, out, masks=masks, manifest=manifest, granularity="filter")
        after = ctx.measure(model)
        return {"config": self.config, "criterion": self.criterion, "granularity": "filter",
                "filters_removed": removed, "params_removed": 1 - after["params"] / before["params"],
                "compacted": manifest is not None, "macs_before": before["macs"], "macs_after": after["macs"],
                "params_before": before["params"], "params_after": after["params"],
                "test_acc_after_prune": ctx.test_accuracy(model)}


class ScheduleSpec(Section):
    """A sparsity schedule (``SCHEDULES``): shape name, window, initial sparsity, shape parameters.

    The final sparsity is the ``prune.target`` fraction.
    """

    name: str = "one_cycle"
    initial: Fraction = 0.0
    start: Fraction = 0.0
    end: Fraction = 1.0
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in SCHEDULES:
            raise ValueError(f"unknown sparsity schedule {name!r}; known: {', '.join(SCHEDULES.names())}")
        return name


_SCHEDULE_FIELD = re.compile(r"^(\w+): ")


@PRUNE_METHODS.register("gradual")
class GradualPrune(PruneSpec):
    """Prune along a sparsity schedule while training for ``train`` (One-Cycle Pruning, AGP,
    iterative, one-shot-in-training): masks are updated before steps and enforced after them."""

    method: Literal["gradual"]
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    every: PositiveInt = 1
    monotone: bool = True
    train: TrainSpec

    @model_validator(mode="after")
    def _buildable(self) -> GradualPrune:
        if self.parsed_target.unit == "macs":
            raise ValueError("target: macs=… needs method oneshot (a gradual schedule ramps weights=… or "
                             "filters=…)")
        if self.granularity == "channel":
            raise ValueError("granularity: channel pruning is not available to recipes yet; use filter")
        try:
            built = self.sparsity_schedule()
        except UserError as exc:
            message = str(exc)
            match = _SCHEDULE_FIELD.match(message)
            key = match[1] if match else "name"
            key = {"schedule_args": "params", "schedule": "name"}.get(key, key)
            if key not in ScheduleSpec.model_fields:
                key = f"params.{key}"
            raise ValueError(f"schedule.{key}: {message[match.end():] if match else message}") from None
        self.schedule.params = dict(built.params)
        return self

    def phase(self) -> TrainSpec:
        return self.train

    def sparsity_schedule(self) -> Schedule:
        s = self.schedule
        return build_schedule(s.name, self.parsed_target.fraction, initial=s.initial, start=s.start, end=s.end,
                              **s.params)

    def run(self, ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
        from prunekit.core.oneshot import filter_prunable_layers
        from prunekit.core.sparsifier import Sparsifier
        from prunekit.methods.gradual import GradualPruning

        model, spec = ctx.load_model(source) if source is not None else ctx.fresh_model()
        kwargs = self.sparsifier_kwargs()
        if self.structured:
            kwargs.update(layers=filter_prunable_layers(model, ctx.example_input()), round_to=self.round_to,
                          normalize=self.scope == "global")
        sparsifier = Sparsifier(model, monotone=self.monotone, seed=ctx.seed, **kwargs)
        if self.structured:
            sparsifier.couple_channels(model, ctx.example_input())
        hook = GradualPruning(sparsifier, self.sparsity_schedule(), every=self.every)
        trainer, result = ctx.fit("prune", model, self.train, [hook])
        realised = sparsifier.realised_sparsity().total
        ctx.save_model(trainer.model, spec, out, masks=sparsifier.masks(), granularity=self.granularity)
        return {"target": self.target, "granularity": self.granularity, "realised_sparsity": realised,
                "realised_covers": "weights of the pruned layers", "schedule": self.sparsity_schedule().describe(),
                **ctx.training_summary(trainer, result)}
