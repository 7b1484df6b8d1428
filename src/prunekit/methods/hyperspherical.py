"""Pruning On-the-Fly (METHODS §1): unit-norm convs, a pruned-energy penalty, pruning at any ratio
without retraining, mean recovery.

The ``prune`` section with ``method: hyperspherical`` acts at three points of a run:

* :meth:`~Hyperspherical.prepare` (``convs: hyperspherical``): the fresh model's convs become
  HSConv2d (the ``hyperspherical`` transform, ``normalize_input`` for the cosine operator), so
  dense training runs from scratch with unit-norm filters (§1.3.4, the CIFAR protocol);
* :meth:`~Hyperspherical.train_hooks`: :class:`PrunedEnergyHook` adds λ(t)·mean_l R_l at the
  penalty's ``sparsity`` to every training step's loss (§1.3.3; λ = 0 adds nothing) and logs each
  prunable layer's R_l = mean_f E_{l,f} at every epoch end (``pruned_energy/<layer>``,
  ``pruned_energy_mean``: metrics.jsonl);
* :meth:`~Hyperspherical.prune`: bake ŵ into plain convs, zero each prunable layer's smallest
  entries at ``ratio`` (exact top-k; first conv always dense, the classifier by
  ``prune_classifier``), and with ``recovery`` refill the pruned entries from their mean (§1.3.6).
  The accuracy right after pruning is measured by the prune stage, with no BN recalibration;
  ``bn_recalibration: N`` adds the accuracy of a copy whose BN statistics were recomputed on N
  training batches, as a separate, labelled extra.

``convs: standard`` is the experiment's conventional arm: no conversion, no penalty (``lam: 0``
when the recipe trains), magnitude pruning of the raw weights at the same layer-wise ratios, so
both accuracy-versus-ratio curves come from one method and one key (``ratio``). The training
keys (``normalize_input``, ``sparsity``, ``lam``, the ramps) act only when the recipe trains from
scratch; pruning a saved model uses ``ratio``, ``scope``, ``prune_classifier``, ``recovery``,
``bn_recalibration``.

A pruned model keeps its zeros with its masks, so a ``retrain`` section fine-tunes it with the
pruned entries held at zero (§1.3.7: the baked plain convs are fine-tuned, starting from exactly
the function that was evaluated). A recovered model is "mask + constant": its pruned entries are
not zero, so it is returned without masks (saved masks are enforced on load and would zero the
constants again); its summary says so in ``sparsity_line`` with the storage cost and gives the
fraction of entries replaced, not a sparsity.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from prunekit.core.energy import PrunedEnergyPenalty
from prunekit.core.hyperspherical import HSConv2d, recalibrate_bn
from prunekit.core.masks import MaskSet
from prunekit.core.onthefly import prunable_layers, prune_at_ratio
from prunekit.core.recovery import describe_cost, recover
from prunekit.core.schedules import SCHEDULES, Schedule, build_schedule
from prunekit.core.transforms import apply_transform, recorded
from prunekit.distributed import current
from prunekit.errors import UserError
from prunekit.methods.base import Method, MethodContext, PruneResult, register_method
from prunekit.schema import Fraction, HalfOpenFraction, NonNegativeFloat, NonNegativeInt
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import EpochMetrics, Trainer

log = logging.getLogger(__name__)

LAMBDA_TOLERANCE = 0.005
"""§1.3.3: the calibrated λ keeps the dense accuracy within 0.5 points of λ = 0."""


@register_method("hyperspherical")
class Hyperspherical(Method):
    """Train with unit-norm convs and the pruned-energy penalty; prune at ``ratio`` with no retraining."""

    method: Literal["hyperspherical"]
    ratio: HalfOpenFraction
    convs: Literal["hyperspherical", "standard"] = "hyperspherical"
    normalize_input: bool = False
    sparsity: HalfOpenFraction = 0.5
    lam: NonNegativeFloat = 1.0
    lam_ramp: Fraction = 0.0
    sparsity_ramp: Fraction = 0.0
    sparsity_ramp_shape: str = "linear"
    prune_classifier: bool = True
    scope: Literal["local", "global"] = "local"
    recovery: Literal["none", "layer_mean", "filter_mean", "signed_abs_mean"] = "none"
    bn_recalibration: NonNegativeInt = 0

    @field_validator("sparsity_ramp_shape")
    @classmethod
    def _known_shape(cls, name: str) -> str:
        if name not in SCHEDULES:
            raise ValueError(f"unknown sparsity schedule {name!r}; known: {', '.join(SCHEDULES.names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Hyperspherical:
        if self.convs == "standard" and self.normalize_input:
            raise ValueError("normalize_input: applies to hyperspherical convs; set convs: hyperspherical")
        return self

    # --------------------------------------------------------------- plug-in calls
    def describe(self) -> dict[str, Any]:
        return {"target": f"weights={self.ratio:g}", "granularity": "weight"}

    def check_recipe(self, recipe: Any) -> None:
        trains = recipe.train is not None and not recipe.train.checkpoint
        if trains and self.convs == "standard" and self.lam > 0:
            raise ValueError("prune.lam: the penalty needs hyperspherical convs; set lam: 0 for the standard arm "
                             "(or convs: hyperspherical)")
        if self.recovery != "none" and recipe.retrain is not None:
            raise ValueError("prune.recovery: a recovered model is mask + constant, but retrain fine-tunes with the "
                             "pruned entries held at zero; set recovery: none")

    def penalty_sparsity(self) -> float | Schedule:
        """The penalty's s, or s(p) rising over the first ``sparsity_ramp`` of training."""
        if self.sparsity_ramp == 0:
            return self.sparsity
        return build_schedule(self.sparsity_ramp_shape, self.sparsity, end=self.sparsity_ramp)

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.convs == "standard":
            return model
        try:
            return apply_transform(model, "hyperspherical", normalize_input=self.normalize_input)
        except UserError as exc:
            raise UserError(f"convs: cannot make this {type(model).__name__} hyperspherical ({exc})") from None

    def train_hooks(self, recipe: Any) -> list[Hook]:
        if self.convs == "standard":
            return []
        return [PrunedEnergyHook(self.lam, self.penalty_sparsity(), self.lam_ramp, self.prune_classifier)]

    def prune(self, model: nn.Module, ctx: MethodContext) -> PruneResult:
        began = time.perf_counter()
        model = self._baked(model)
        layers = prunable_layers(model, self.prune_classifier)
        before = {name: layer.weight.detach().clone() for name, layer in layers.items()} \
            if self.recovery != "none" else {}
        masks = prune_at_ratio(model, self.ratio, prune_classifier=self.prune_classifier, scope=self.scope,
                               scores="effective" if self.convs == "hyperspherical" else "raw")
        elapsed = time.perf_counter() - began
        pruned = sum(int((~m).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        summary: dict[str, Any] = {
            "convs": self.convs, "ratio": self.ratio, "scope": self.scope, "pruned_layers": len(masks),
            "ranked_by": ("|ŵ| of the baked unit-norm filters (classifier rows normalised)"
                          if self.convs == "hyperspherical" else "|w| of the raw weights (magnitude pruning)"),
            "first_conv": "dense (exempt)", "classifier": "pruned" if self.prune_classifier else "dense"}
        if self.recovery == "none":
            mask_set = MaskSet.attach(model, masks, "weight")
            summary["sparsity_line"] = (f"sparse: {pruned:,} of {total:,} weights of the {len(masks)} prunable "
                                        f"layers are zero ({pruned / total:.4f})")
        else:
            if ctx.has_data:
                summary["test_acc_before_recovery"] = ctx.test_accuracy(model)
            began = time.perf_counter()
            costs = recover(model, masks, before, self.recovery)
            elapsed += time.perf_counter() - began
            mask_set = None
            summary.update({"recovery": self.recovery, "sparsity_line": describe_cost(costs, self.recovery),
                            "replaced_fraction": pruned / total,
                            "replaced_covers": f"weights of the {len(masks)} prunable layers, now a constant "
                                               "each (not zero: the model is not sparse)",
                            "storage_bits": sum(c.bits() for c in costs.values()), "dense_bits": 32 * total})
        summary["prune_time_s"] = elapsed
        log.info("hyperspherical: pruned at %g in %.3f s; %s", self.ratio, elapsed, summary["sparsity_line"])
        if self.bn_recalibration:
            summary.update(self._recalibrated(model, ctx))
        return PruneResult(model, masks=mask_set, summary=summary)

    # --------------------------------------------------------------------- helpers
    def _baked(self, model: nn.Module) -> nn.Module:
        """The model with ŵ baked into plain convs (``convs: hyperspherical``), or as it is (standard)."""
        hyperspherical = any(isinstance(m, HSConv2d) for m in model.modules())
        baked = any(entry["name"] == "bake_hyperspherical" for entry in recorded(model))
        if baked:
            raise UserError("convs: the model's hyperspherical convs are already baked (a pruned model); "
                            "prune its dense model")
        if self.convs == "standard":
            if hyperspherical:
                raise UserError("convs: the model has hyperspherical convs; set convs: hyperspherical")
            return model
        if not hyperspherical:
            raise UserError("convs: the model has no hyperspherical conv; for magnitude pruning of a standard "
                            "model set convs: standard")
        return apply_transform(model, "bake_hyperspherical")

    def _recalibrated(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        """The labelled extra: accuracy of a copy with BN statistics recomputed on training batches."""
        twin = copy.deepcopy(model).to(ctx.device)
        used = recalibrate_bn(twin, ctx.data.train, self.bn_recalibration)
        current().broadcast_buffers(twin)  # under torchrun: rank 0's statistics (its shard's batches)
        return {"test_acc_bn_recalibrated_extra": ctx.test_accuracy(twin),
                "bn_recalibration": f"extra, not the headline figure: BatchNorm statistics of a copy recomputed "
                                    f"on {used} training batches; the saved model keeps its own"}


class PrunedEnergyHook(Hook):
    """The penalty on every step's loss (λ > 0) and each prunable layer's R_l at every epoch end.

    The layers are the model's prunable ones (:func:`~prunekit.core.onthefly.prunable_layers`),
    found when training begins; it needs no state of its own (λ(t) and s(t) follow the progress).
    """

    def __init__(self, lam: float, sparsity: float | Schedule, lam_ramp: float = 0.0,
                 prune_classifier: bool = True) -> None:
        self.settings = {"lam": lam, "sparsity": sparsity, "lam_ramp": lam_ramp}
        self.prune_classifier = prune_classifier
        self.penalty: PrunedEnergyPenalty | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.penalty = PrunedEnergyPenalty(prunable_layers(trainer.model, self.prune_classifier), **self.settings)

    def extra_loss(self, trainer: Trainer, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        if self.penalty.lam == 0:
            return None
        return self.penalty(trainer.progress)[0]

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        progress = trainer.progress
        with torch.no_grad():
            energies = self.penalty.by_layer(self.penalty(progress)[1])
        metrics.extra.update({"pruned_energy_mean": sum(energies.values()) / len(energies),
                              "penalty_lam": self.penalty.lam_at(progress),
                              "penalty_sparsity": self.penalty.sparsity_at(progress)})
        metrics.extra.update({f"pruned_energy/{name}": value for name, value in energies.items()})


def pick_lambda(dense_accuracy: Mapping[float, float], tolerance: float = LAMBDA_TOLERANCE) -> float:
    """The largest λ whose dense accuracy is within ``tolerance`` (a fraction: 0.005 = 0.5 points)
    of λ = 0's (§1.3.3); ``dense_accuracy`` maps λ to accuracy and must hold λ = 0."""
    if 0 not in dense_accuracy:
        raise UserError("lam: the calibration needs the unpenalised run (λ = 0) as its reference")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise UserError(f"tolerance: expected a fraction >= 0, got {tolerance!r}")
    reference = dense_accuracy[0]
    return max(lam for lam, acc in dense_accuracy.items() if acc >= reference - tolerance - 1e-12)
