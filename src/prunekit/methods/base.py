"""The method plug-in interface: a schema that describes, a protocol that acts.

A method is one file in ``methods/``: a :class:`Method` subclass (the recipe's ``prune``
section for that method, validated strictly, registered by name in :data:`METHODS`) whose
behaviour is a few calls the runner makes at fixed points, each with a no-op default:

* :meth:`Plugin.check_recipe` — cross-section checks before anything runs;
* :meth:`Method.prepare` — change a freshly built model before any training (a transform);
* :meth:`Plugin.train_hooks` — Trainer hooks for the dense training stage;
* :meth:`Method.prune` — act on the model the previous stage left: return a :class:`PruneResult`
  (the model, its masks or compaction manifest, a summary, the training it did);
* :meth:`Plugin.before_retrain` — change the pruned model before retraining.

:func:`run_prune` is the prune stage for every method, whether ``prunekit run`` or ``prunekit
prune`` calls it: it measures, prunes, compacts (filter masks, when asked), saves the pruned
model in the one model format (:mod:`prunekit.artifact`) and returns the stage summary.
Retraining extensions (weight rewinding) are :class:`Plugin` objects registered by LR plan
name in :data:`RETRAIN_EXTENSIONS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit.core.compaction import compact_masked
from prunekit.core.manifest import Manifest
from prunekit.core.masks import MaskSet
from prunekit.distributed import current
from prunekit.errors import UserError
from prunekit.registry import Registry
from prunekit.schema import Section, TrainSpec

if TYPE_CHECKING:
    from prunekit.artifact import ModelSpec
    from prunekit.core.schedules import Schedule
    from prunekit.data import DataBundle
    from prunekit.train.config import TrainConfig
    from prunekit.train.hooks import Hook
    from prunekit.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

Fit = Callable[..., tuple["Trainer", "TrainResult"]]
"""``fit(model, spec, hooks, data=None)``: train a model for one phase in the stage's folder
(resuming from its checkpoint); ``spec`` a TrainSpec or a TrainConfig, ``data`` another DataBundle."""


@dataclass
class MethodContext:
    """What a method may use: the seed, the input shape, the device, data (built on first use)
    and training into its stage's folder."""

    seed: int
    input_shape: tuple[int, ...]
    device: torch.device
    data_factory: Callable[..., DataBundle] | None = None
    """``data_factory(**changes)``: the data set, e.g. ``batch_size=64`` for another batch size."""
    fit_fn: Fit | None = None
    eval_precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    """Whatever the caller knows beyond this (the recipe, the run directory) for plug-ins that need it."""

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)

    @property
    def has_data(self) -> bool:
        return self.data_factory is not None

    @cached_property
    def data(self) -> DataBundle:
        return self.data_with()

    def data_with(self, **changes: Any) -> DataBundle:
        """The data set with other loader settings (``batch_size=64``), built anew."""
        if self.data_factory is None:
            raise UserError("--data-dir: this method needs the data set; say where it is")
        return self.data_factory(**changes)

    def fit(self, model: nn.Module, spec: TrainSpec | TrainConfig, hooks: Sequence[Hook], *,
            data: DataBundle | None = None) -> tuple[Trainer, TrainResult]:
        """Train in the stage's folder; ``spec`` a recipe phase or a TrainConfig (frozen training,
        step budgets), ``data`` another data set than the context's (another batch size)."""
        if self.fit_fn is None:
            raise UserError("train: this method trains, which needs data and a run directory")
        return self.fit_fn(model, spec, hooks, data=data)

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 on the test split at ``eval_precision`` (the model ends on the CPU)."""
        from prunekit.measure.accuracy import evaluate

        result = evaluate(model.to(self.device), self.data.test, device=self.device, precision=self.eval_precision)
        model.to("cpu")
        return result.accuracy


@dataclass
class PruneResult:
    """What a method's prune step produced.

    ``masks``: the pruned model's masks (zeros in place); ``manifest``: set when the method
    compacted the model itself; ``training``: the training it did (None: it only pruned);
    ``summary``: its own figures for the stage marker.
    """

    model: nn.Module
    masks: MaskSet | None = None
    manifest: Manifest | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    trainer: Trainer | None = None
    training: TrainResult | None = None


class Plugin:
    """Calls the runner makes at fixed points of a recipe run; all optional."""

    def check_recipe(self, recipe: Any) -> None:
        """Raise ``ValueError("section.key: problem")`` when the rest of the recipe does not fit."""

    def train_hooks(self, recipe: Any) -> list[Hook]:
        """Hooks for the dense training stage (e.g. saving rewind points)."""
        return []

    def before_retrain(self, model: nn.Module, spec: ModelSpec, masks: MaskSet | None, ctx: MethodContext) -> None:
        """Change the pruned model before its retraining starts (in place)."""


class Method(Section, Plugin):
    """The ``prune`` section of one method; subclasses add their keys and override the calls."""

    method: str

    def phase(self) -> TrainSpec | None:
        """The training :meth:`prune` does (None: it does not train)."""
        return None

    def sparsity_schedule(self) -> Schedule | None:
        """The target sparsity over :meth:`phase` (for plots), for methods that follow one."""
        return None

    def describe(self) -> dict[str, Any]:
        """``target`` and ``granularity`` for the results store, tables and plots."""
        return {"target": getattr(self, "target", None), "granularity": getattr(self, "granularity", None)}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Change a freshly built model before any training (e.g. apply a transform)."""
        return model

    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        raise NotImplementedError(f"method {self.method!r} does not implement prune()")


METHODS: Registry[type[Method]] = Registry("pruning method")
RETRAIN_EXTENSIONS: Registry[Callable[[Any], Plugin]] = Registry("retraining extension")
"""LR plan name -> ``factory(retrain_spec) -> Plugin``: what retraining with that plan needs besides its LR."""


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Decorator: register a :class:`Method` subclass whose ``method`` field is ``Literal[name]``."""
    return METHODS.register(name)


def plugins_for(recipe: Any) -> list[Plugin]:
    """The plug-ins a recipe uses: its prune method, then its retraining plan's extension if any."""
    plugins: list[Plugin] = [recipe.prune] if recipe.prune is not None else []
    if recipe.retrain is not None and recipe.retrain.lr_plan in RETRAIN_EXTENSIONS:
        plugins.append(RETRAIN_EXTENSIONS.get(recipe.retrain.lr_plan)(recipe.retrain))
    return plugins


def validate_method(section: Any) -> Method:
    """The :class:`Method` for a ``prune`` mapping (its ``method`` names the class); pydantic errors propagate."""
    if not isinstance(section, dict):
        raise ValueError(f"expected a mapping with a method key, got {section!r}")
    if "method" not in section:
        raise ValueError(f"method: required key is missing; known: {', '.join(METHODS.names())}")
    name = section["method"]
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: unknown pruning method {name!r}; known: {', '.join(METHODS.names())}")
    return METHODS.get(name).model_validate(section)


# ------------------------------------------------------------------------- the prune stage
def run_prune(method: Method, model: nn.Module, spec: ModelSpec, ctx: MethodContext, out: Path, *,
              compact: bool) -> dict[str, Any]:
    """Prune ``model`` with ``method``, compact filter masks when ``compact``, save into ``out``.

    Returns the stage summary: the method's own figures plus, for every method, MACs and
    params before and after, what was removed, and the accuracy right after pruning (when the
    method did not train and data are at hand) or its training summary.
    """
    from prunekit.artifact import save_artifact
    from prunekit.measure import count_macs, count_params

    if spec.manifest is not None:
        raise UserError("model: is already compacted; prune its dense model")
    macs_before, params_before = count_macs(model, ctx.input_shape).total, count_params(model)
    result = method.prune(model, ctx)
    model, masks, manifest = result.model.to("cpu"), result.masks, result.manifest
    ranks = current()  # under torchrun every rank pruned; they must agree
    if masks is not None:
        ranks.check_identical("masks", masks.checksum())
    if manifest is not None:
        ranks.check_same("kept channels", sorted(manifest.kept.items()))
    units_removed = _units_removed(masks)
    diff = None
    if masks is not None and masks.structured:
        if compact:
            compaction = compact_masked(model, masks, ctx.example_input())
            model, manifest, masks, diff = compaction.model, compaction.manifest, None, compaction.max_abs_diff
        elif not masks.coupled:
            masks.couple_channels(model, ctx.example_input())
    removed = _removed(masks, manifest)
    macs_after, params_after = count_macs(model, ctx.input_shape).total, count_params(model)
    achieved = _check_target(method, units_removed, 1 - macs_after / macs_before if manifest is not None else None)
    save_artifact(model, spec, out, masks=masks, manifest=manifest)
    summary = {"method": method.method, **method.describe(), **removed, **achieved,
               "compacted": manifest is not None, "max_abs_diff": diff,
               "macs_before": macs_before, "macs_after": macs_after,
               "params_before": params_before, "params_after": params_after,
               "params_removed": 1 - params_after / params_before, **result.summary}
    if result.training is not None:
        summary.update(training_summary(result.trainer, result.training))
    elif ctx.has_data:
        summary["test_acc_after_prune"] = ctx.test_accuracy(model)
    return summary


TARGET_TOLERANCE = 0.01
"""How far (absolute fraction) the achieved value may be from the target before a warning."""


def _units_removed(masks: MaskSet | None) -> float | None:
    """The fraction of the masks' units (weights, filters, ...) that are pruned."""
    if masks is None:
        return None
    units = masks.unit_masks().values()
    total = sum(u.numel() for u in units)
    return 1 - sum(int(u.sum()) for u in units) / total if total else None


def _check_target(method: Method, units_removed: float | None, macs_removed: float | None) -> dict[str, Any]:
    """The achieved value of the method's ``target`` (MACs: counted on the compacted model, so
    only when compacted); an error when nothing was removed, a warning when it is more than
    :data:`TARGET_TOLERANCE` away."""
    from prunekit.core.targets import UNITS, parse_target

    described = method.describe().get("target")
    if not isinstance(described, str) or described.partition("=")[0] not in UNITS:
        return {}  # no fraction target (e.g. a filter configuration)
    target = parse_target(described)
    value = macs_removed if target.unit == "macs" else units_removed
    if value is None:
        return {}
    round_to = getattr(method, "round_to", None)
    if target.fraction > 0 and value <= 0:
        hint = f" (round_to={round_to} keeps every unit of every layer)" if round_to else ""
        raise UserError(f"prune.target: {target} removed nothing{hint}; nothing was written")
    if abs(value - target.fraction) > TARGET_TOLERANCE:
        log.warning("prune.target %s: achieved %s=%.4f, %+.4f from the target%s", target, target.unit, value,
                    value - target.fraction, f" (round_to={round_to})" if round_to else "")
    return {"target_achieved": value, "target_met": abs(value - target.fraction) <= TARGET_TOLERANCE}


def _removed(masks: MaskSet | None, manifest: Manifest | None) -> dict[str, Any]:
    if manifest is not None:
        kept, channels = sum(len(k) for k in manifest.kept.values()), sum(manifest.channels.values())
        return {"realised_sparsity": 1 - kept / channels if channels else 0.0,
                "realised_covers": "filters of the pruned channel groups"}
    if masks is not None:
        return {"realised_sparsity": masks.realised_sparsity().total,
                "realised_covers": f"weights of the {len(masks.layers)} masked layers"}
    return {}


def training_summary(trainer: Trainer, result: TrainResult) -> dict[str, Any]:
    """The figures of one training phase that stage markers and the store keep."""
    return {"final_test_acc": result.final_test_acc, "best_test_acc": result.best_test_acc,
            "best_epoch": result.best_epoch, "epochs": len(result.history),
            "steps_per_epoch": trainer.steps_per_epoch, "trainer_wall_time_s": result.wall_time_s,
            "precision": trainer.precision}
