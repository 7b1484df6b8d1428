"""Weight rewinding support for retraining after pruning (METHODS §2.4.2, Network Pruning That Matters).

Weight rewinding retrains a pruned model for t epochs from the weights the *original* run had
at epoch T − t, under the pruned model's masks, with the original LR schedule replayed from
there (:class:`~prunekit.train.lr_plans.WeightRewind`). So the original training must save
those weights, and it should not need the user to plan for it:

* :class:`RecordRewindPoints` is a Trainer hook that saves the model's state (safetensors,
  atomic) after the epochs a set of retraining budgets needs, under ``<run_dir>/rewind/``;
  ``RecordRewindPoints.for_budgets(T, budgets)`` derives the epochs T − t.
* :func:`load_rewind_point` reads one back; :func:`rewind_weights` puts it into the pruned
  model: a dense-shaped masked model gets the saved tensors times its current masks, a
  compacted model gets them sliced to its kept channels (through its manifest, by compacting
  a dense copy with :func:`prunekit.core.compaction.compact`, so the slicing is the one the
  model itself went through).

The rest of the retraining variants are LR plans (``finetune``, ``lr_rewind``,
``scaled_restart``, ``cyclic_restart`` in :mod:`prunekit.train.lr_plans`) passed to the Trainer as
``lr_plan=``. In a recipe, the plans that replay the original run register retraining
extensions (:data:`~prunekit.methods.base.RETRAIN_EXTENSIONS`): :class:`ReplayOriginal`
checks that ``original_epochs`` is the dense training's, :class:`RewindWeights` also saves the
rewind point during dense training and loads it into the pruned model before retraining.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.core.compaction import compact
from prunekit.core.manifest import Manifest
from prunekit.core.masks import MASK, MaskSet
from prunekit.errors import UserError
from prunekit.io import atomic_path
from prunekit.methods.base import RETRAIN_EXTENSIONS, MethodContext, Plugin
from prunekit.schema import TrainSpec
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.artifact import ModelSpec
    from prunekit.train.trainer import EpochMetrics, Trainer

log = logging.getLogger(__name__)

REWIND_DIR = "rewind"
FORMAT = "prunekit.rewind/1"


def rewind_epochs(original_epochs: int, budgets: Iterable[int]) -> list[int]:
    """The original epochs T − t that retraining budgets t need saved (sorted, distinct).

    Epoch E means "after E epochs of training" (0 = the initialisation).
    """
    if isinstance(original_epochs, bool) or not isinstance(original_epochs, int) or original_epochs < 1:
        raise UserError(f"original_epochs: expected an integer >= 1, got {original_epochs!r}")
    epochs = set()
    for t in budgets:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= original_epochs:
            raise UserError(f"budgets: expected retraining budgets in [1, {original_epochs}] epochs, got {t!r}")
        epochs.add(original_epochs - t)
    return sorted(epochs)


def rewind_point_path(directory: str | Path, epoch: int) -> Path:
    """Where the weights after ``epoch`` original epochs are stored inside ``directory``."""
    return Path(directory) / f"epoch-{epoch:04d}.safetensors"


def save_rewind_point(model: nn.Module, path: str | Path, epoch: int) -> Path:
    """Write the model's state (parameters and buffers, masks excluded) atomically."""
    path = Path(path)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "epoch": str(epoch)})
    log.info("saved rewind point of epoch %d to %s", epoch, path)
    return path


def load_rewind_point(path: str | Path, epoch: int | None = None) -> dict[str, torch.Tensor]:
    """The saved state of a rewind point: a file, or a directory (a run dir or its ``rewind/``) and an epoch."""
    path = Path(path)
    if epoch is not None:
        directory = path / REWIND_DIR if (path / REWIND_DIR).is_dir() else path
        path = rewind_point_path(directory, epoch)
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("epoch-*.safetensors")) if path.parent.is_dir() else []
        raise UserError(f"rewind point: {str(path)!r} does not exist"
                        + (f" (saved: {', '.join(have)})" if have else " (no rewind point saved there)"))
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"rewind point: cannot read {str(path)!r} ({exc})") from None


class RecordRewindPoints(Hook):
    """Trainer hook: save the weights after each of ``epochs`` (completed epochs; 0 = before training).

    Files go to ``directory``, by default ``<run_dir>/rewind/`` of the Trainer; each is written
    atomically, by the main process only. A resumed run re-saves nothing it already passed.
    """

    def __init__(self, epochs: Iterable[int], directory: str | Path | None = None) -> None:
        self.epochs = sorted(set(epochs))
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.epochs):
            raise UserError(f"epochs: expected integers >= 0 (completed original epochs), got {self.epochs!r}")
        self.directory = Path(directory) if directory is not None else None
        self.saved: dict[int, Path] = {}

    @classmethod
    def for_budgets(cls, original_epochs: int, budgets: Iterable[int],
                    directory: str | Path | None = None) -> RecordRewindPoints:
        """The points that weight rewinding with each retraining budget t needs: T − t."""
        return cls(rewind_epochs(original_epochs, budgets), directory)

    def _directory(self, trainer: Trainer) -> Path:
        if self.directory is not None:
            return self.directory
        if trainer.run_dir is None:
            raise UserError("directory: RecordRewindPoints needs a directory, or a Trainer with a run_dir")
        return trainer.run_dir / REWIND_DIR

    def on_train_begin(self, trainer: Trainer) -> None:
        late = [e for e in self.epochs if e > trainer.total_epochs]
        if late:
            raise UserError(f"epochs: rewind points {late} lie beyond the run's {trainer.total_epochs} epochs")
        if trainer.epoch == 0 and 0 in self.epochs:
            self._save(trainer, 0)

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        if trainer.epoch in self.epochs:
            self._save(trainer, trainer.epoch)

    def _save(self, trainer: Trainer, epoch: int) -> None:
        path = rewind_point_path(self._directory(trainer), epoch)
        if trainer.dist.is_main:
            save_rewind_point(trainer.model, path, epoch)
        self.saved[epoch] = path


def rewind_weights(model: nn.Module, snapshot: Mapping[str, torch.Tensor], *,
                   manifest: Manifest | Mapping[str, Any] | None = None, dense: nn.Module | None = None,
                   example_input: torch.Tensor | None = None) -> nn.Module:
    """Reset ``model`` (in place) to the saved state ``snapshot`` of its dense original.

    * Without ``manifest``, the model has the original's shapes: it receives every saved tensor
      (parameters and buffers such as BN statistics), then each weight is multiplied by its
      current ``weight_mask`` (Sparsifier), so pruned weights stay zero and masks are untouched.
    * With the ``manifest`` of a compacted model (``CompactionResult.manifest`` or the dict in
      ``ModelSpec.manifest``), pass ``dense``, a model of the original (dense) architecture, and
      an ``example_input``: the snapshot is loaded into ``dense`` (which is consumed), ``dense`` is
      compacted with the manifest, and its state copied into ``model``.
    """
    if manifest is not None:
        if dense is None or example_input is None:
            raise UserError("dense: rewinding a compacted model needs the dense architecture (dense=) "
                            "and an example_input to slice the snapshot with its manifest")
        if not isinstance(manifest, Manifest):
            manifest = Manifest.from_dict(dict(manifest))
        _load_exactly(dense, snapshot, "the dense model")
        snapshot = compact(dense, manifest.keep(), example_input, verify=False).model.state_dict()
    _load_exactly(model, snapshot, "the model")
    with torch.no_grad():
        for module in model.modules():
            mask = module._buffers.get(MASK)
            if mask is not None:
                module.weight.mul_(mask)
    return model


def rewind_weights_from_spec(model: nn.Module, snapshot: Mapping[str, torch.Tensor], spec: ModelSpec) -> nn.Module:
    """:func:`rewind_weights` for a model loaded with :func:`prunekit.artifact.load_artifact`:
    the dense architecture, example input and manifest come from its ``spec``."""
    from prunekit.models import build_model

    if spec.manifest is None:
        return rewind_weights(model, snapshot)
    dense = build_model(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    return rewind_weights(model, snapshot, manifest=spec.manifest, dense=dense,
                          example_input=torch.zeros(1, *spec.input_shape))


def _load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that first names the tensor that does not fit (one line)."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"rewind point: does not fit {what} ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors; {detail})")
    for name, value in own.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise UserError(f"rewind point: {name!r} is {tuple(state[name].shape)} in the snapshot, "
                            f"{tuple(value.shape)} in {what}")
    model.load_state_dict(dict(state))


# ------------------------------------------------------------------ recipe extensions
class ReplayOriginal(Plugin):
    """A plan that replays the original run's LR from epoch T − t: T must be the dense training's."""

    def __init__(self, retrain: TrainSpec) -> None:
        self.retrain = retrain
        self.original_epochs = retrain.lr_plan_args.get("original_epochs")

    def check_recipe(self, recipe: Any) -> None:
        train = recipe.train
        if train is not None and not train.checkpoint and self.original_epochs != train.epochs:
            raise ValueError(f"retrain.lr_plan_args.original_epochs: expected {train.epochs} (train.epochs: the "
                             f"original run it replays), got {self.original_epochs!r}")


class RewindWeights(ReplayOriginal):
    """Weight rewinding: the surviving weights restart from the original run's after epoch T − t."""

    @property
    def epoch(self) -> int:
        return self.original_epochs - self.retrain.epochs

    def check_recipe(self, recipe: Any) -> None:
        super().check_recipe(recipe)
        train = recipe.train
        if train is None:
            raise ValueError(f"retrain.lr_plan: {self.retrain.lr_plan} needs the original training (a train "
                             "section, or train.checkpoint with its rewind/ points)")
        if train.checkpoint:
            point = rewind_point_path(Path(train.checkpoint) / REWIND_DIR, self.epoch)
            if not point.is_file():
                raise ValueError(f"retrain.lr_plan: {self.retrain.lr_plan} with epochs={self.retrain.epochs} needs "
                                 f"the weights after original epoch {self.epoch}, but {str(point)!r} does not exist "
                                 "(train with train.rewind_points to keep them)")

    def train_hooks(self, recipe: Any) -> list[Hook]:
        return [] if self.epoch in recipe.train.rewind_points else [RecordRewindPoints([self.epoch])]

    def before_retrain(self, model: nn.Module, spec: ModelSpec, masks: MaskSet | None, ctx: MethodContext) -> None:
        rewind_weights_from_spec(model, load_rewind_point(ctx.extra["dense_dir"], self.epoch), spec)
        if masks is not None:  # the tensors coupled to pruned filters (BN, consumer inputs) back to zero
            masks.enforce()


RETRAIN_EXTENSIONS.register("lr_rewind")(ReplayOriginal)
RETRAIN_EXTENSIONS.register("weight_rewind")(RewindWeights)
