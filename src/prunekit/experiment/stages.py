"""The stages of one run, in order: train → prune → retrain → compact → evaluate → export.

Each stage reads what the previous one wrote in the run directory, writes its own output into
its folder, and last a ``stage.json`` marker with its summary. A stage whose marker exists is
skipped, so a resumed run continues at the first unfinished stage; a training stage also
resumes from its own ``checkpoints/last.pt`` (exactly, see the Trainer). Models always pass
between stages through disk in the one model format (:mod:`prunekit.artifact`: ``model.json`` +
``model.safetensors``, masks in ``masks.safetensors``), so an interrupted and an
uninterrupted run follow the same path. The stages know no method: the recipe's plug-ins
(:func:`prunekit.methods.plugins_for`) add hooks, prune and prepare retraining.

Under torchrun every rank runs every stage (training under DDP, data sharded by rank); rank 0
decides which stages are done and alone writes (:mod:`prunekit.io`); the ranks meet after each
stage, so the next one reads what rank 0 wrote (the run directory must be on a file system
every rank sees).

    RUN_DIR/
      recipe.yaml  run.json  result.json  metrics.jsonl  metrics.csv
      train/    checkpoints/last.pt  metrics.jsonl  model.*  stage.json     dense model
      prune/    model.*  masks.safetensors  stage.json  (+ checkpoints/ for methods that train)
      retrain/  checkpoints/last.pt  metrics.jsonl  model.*  masks.safetensors  stage.json
      final/    model.*  stage.json                 the compacted (or mask-squashed) final model
      evaluate/ layers.json  stage.json             accuracy, MACs, params, sparsity, per layer
      export/   model.onnx  stage.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from prunekit.artifact import ModelSpec, load_artifact, load_masks, save_artifact
from prunekit.core.compaction import compact_masked
from prunekit.data import DataBundle, build_data
from prunekit.device import resolve_device
from prunekit.distributed import current
from prunekit.experiment.loggers import LoggerHook, MetricLogger
from prunekit.experiment.recipe import Recipe
from prunekit.io import make_dirs, write_json
from prunekit.measure import count_macs, count_params
from prunekit.methods import MethodContext, plugins_for, run_prune
from prunekit.methods.base import training_summary
from prunekit.methods.retraining import RecordRewindPoints
from prunekit.models import build_model
from prunekit.schema import TrainSpec
from prunekit.train.config import TrainConfig
from prunekit.train.hooks import Hook
from prunekit.train.masking import EnforceMasks
from prunekit.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

STAGES = ("train", "prune", "retrain", "compact", "evaluate", "export")
STAGE_DIRS = {"train": "train", "prune": "prune", "retrain": "retrain", "compact": "final",
              "evaluate": "evaluate", "export": "export"}
MARKER = "stage.json"

HooksFor = Callable[[str], Sequence[Hook]]
"""Extra Trainer hooks for a training stage (the CLI's progress bar)."""
Events = Callable[[str, str, dict[str, Any]], None]
"""``(stage, event, info)`` with event ``start``, ``skip`` or ``done``."""


class StageContext:
    """What stages share within one run: the recipe (one seed), the run directory, data, device."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, loggers: Sequence[MetricLogger] = (),
                 hooks_for: HooksFor | None = None, events: Events | None = None,
                 launch: dict[str, Any] | None = None) -> None:
        self.recipe = recipe
        self.ranks = current()
        self.launch = dict(launch or {})
        """TrainConfig fields the launch sets for every training (``scale_lr``, ``sync_batchnorm``)."""
        self.seed = recipe.seeds[0]
        self.run_dir = Path(run_dir)
        self.device = resolve_device(recipe.device)
        self.loggers = list(loggers)
        self.hooks_for = hooks_for or (lambda stage: ())
        self.events = events or (lambda stage, event, info: None)
        self.plugins = plugins_for(recipe)

    # ------------------------------------------------------------------ data
    @cached_property
    def data(self) -> DataBundle:
        return self.build_data()

    def build_data(self, **changes: Any) -> DataBundle:
        """The recipe's data set; ``changes`` override loader settings (``batch_size=64``)."""
        return recipe_data(self.recipe, seed=self.seed, **changes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)

    def method_context(self, stage: str) -> MethodContext:
        """What a plug-in sees in ``stage``: training goes into the stage's folder."""
        return MethodContext(self.seed, self.input_shape, self.device,
                             data_factory=lambda **changes: self.build_data(**changes) if changes else self.data,
                             fit_fn=lambda model, spec, hooks, data=None: self.fit(stage, model, spec, hooks, data),
                             eval_precision=self.recipe.evaluate.precision,
                             extra={"recipe": self.recipe, "run_dir": self.run_dir, "dense_dir": self.dense_dir})

    @property
    def dense_dir(self) -> Path:
        """Where the dense training's outputs (model, rewind points) are."""
        train = self.recipe.train
        return Path(train.checkpoint) if train is not None and train.checkpoint else self.run_dir / STAGE_DIRS["train"]

    # ---------------------------------------------------------------- models
    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.recipe.model.name, num_classes=self.data.num_classes,
                         in_channels=self.input_shape[0], input_shape=self.input_shape, data=self.recipe.data.name)

    def dense_model(self) -> nn.Module:
        """The architecture, freshly initialised from the run's seed."""
        torch.manual_seed(self.seed)
        return build_model(self.recipe.model.name, num_classes=self.data.num_classes, in_channels=self.input_shape[0])

    def fresh_model(self) -> tuple[nn.Module, ModelSpec]:
        model = self.dense_model()
        if self.recipe.prune is not None:
            model = self.recipe.prune.prepare(model)
        return model, self.model_spec()

    def test_accuracy(self, model: nn.Module) -> float:
        return self.method_context("evaluate").test_accuracy(model)

    def measure(self, model: nn.Module) -> dict[str, int]:
        return {"macs": count_macs(model, self.input_shape).total, "params": count_params(model)}

    # -------------------------------------------------------------- training
    def fit(self, stage: str, model: nn.Module, spec: TrainSpec | TrainConfig, hooks: Sequence[Hook],
            data: DataBundle | None = None) -> tuple[Trainer, TrainResult]:
        """Train ``model`` in the stage's folder, resuming from its checkpoint when there is one
        (``spec`` a recipe phase, or a TrainConfig a method built itself)."""
        run_dir = self.run_dir / STAGE_DIRS[stage]
        before = sum(s.epochs for name, s in self.recipe.phases() if STAGES.index(name) < STAGES.index(stage))
        hooks = [*hooks, LoggerHook(self.loggers, stage, before), *self.hooks_for(stage)]
        data = data or self.data
        config = spec.config(self.seed) if isinstance(spec, TrainSpec) else spec
        config = dataclasses.replace(config, **self.launch)
        trainer = Trainer(model, data.train, data.test, config, hooks=hooks, run_dir=run_dir, device=self.device)
        return trainer, trainer.fit(resume=True)


def recipe_data(recipe: Recipe, **changes: Any) -> DataBundle:
    """The data set of ``recipe``'s data section; ``changes`` override loader settings."""
    d = recipe.data
    settings = {"data_dir": d.data_dir, "batch_size": d.batch_size, "test_batch_size": d.test_batch_size,
                "augment": d.augment, "subset": d.subset, "download": d.download}
    return build_data(d.name, **{**settings, **changes})


# ---------------------------------------------------------------------- the stages
def read_json(path: Path) -> Any:
    """The JSON document at ``path``, or None when there is none (also when a parent is a file)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def done(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    return read_json(ctx.run_dir / STAGE_DIRS[stage] / MARKER)


def applies(recipe: Recipe, stage: str) -> bool:
    return {"train": recipe.train is not None, "prune": recipe.prune is not None,
            "retrain": recipe.retrain is not None, "export": recipe.export.onnx}.get(stage, True)


def model_source(ctx: StageContext, stage: str) -> Path | None:
    """The folder of the latest model before ``stage`` (None: no stage made one yet)."""
    for earlier in reversed(STAGES[: STAGES.index(stage)]):
        if earlier in ("train", "prune", "retrain", "compact") and applies(ctx.recipe, earlier):
            return ctx.run_dir / STAGE_DIRS[earlier]
    return None


def run_stages(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Run every stage of the recipe that is not done yet; the markers of all of them."""
    markers: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if not applies(ctx.recipe, stage):
            continue
        marker = ctx.ranks.broadcast(done(ctx, stage))  # rank 0's view: another rank may be ahead of a write
        if marker is not None:
            ctx.events(stage, "skip", marker)
            log.info("stage %s already done in %s", stage, ctx.run_dir)
            markers[stage] = marker
            continue
        ctx.events(stage, "start", {})
        began = time.perf_counter()
        out = ctx.run_dir / STAGE_DIRS[stage]
        make_dirs(out)
        summary = STAGE_FUNCTIONS[stage](ctx, model_source(ctx, stage), out)
        elapsed = time.perf_counter() - began
        # a training stage's own clock spans every session of a resumed run; others take this session's
        summary = {"stage": stage, **summary,
                   "wall_time_s": summary.pop("trainer_wall_time_s", None) or elapsed}
        write_json(out / MARKER, summary)
        ctx.ranks.barrier()
        ctx.events(stage, "done", summary)
        markers[stage] = summary
    return markers


def _load(source: Path) -> tuple[nn.Module, ModelSpec, Any]:
    model, spec = load_artifact(source)
    return model, spec, load_masks(model, spec, source)


def _train(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    spec = ctx.recipe.train
    if spec.checkpoint:
        model, saved = load_artifact(spec.checkpoint)
        save_artifact(model, saved, out)
        return {"checkpoint": spec.checkpoint, "dense_test_acc": ctx.test_accuracy(model)}
    model, mspec = ctx.fresh_model()
    hooks = [RecordRewindPoints(spec.rewind_points)] if spec.rewind_points else []
    hooks += [hook for plugin in ctx.plugins for hook in plugin.train_hooks(ctx.recipe)]
    trainer, result = ctx.fit("train", model, spec, hooks)
    save_artifact(trainer.model, mspec, out)
    # measured like the final model (evaluate.precision), so the two accuracies compare
    return {**training_summary(trainer, result), "dense_test_acc": ctx.test_accuracy(trainer.model)}


def _prune(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    model, spec = load_artifact(source) if source is not None else ctx.fresh_model()
    return run_prune(ctx.recipe.prune, model, spec, ctx.method_context("prune"), out, compact=ctx.recipe.compact)


def _retrain(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    model, spec, masks = _load(source)
    mctx = ctx.method_context("retrain")
    for plugin in ctx.plugins:
        plugin.before_retrain(model, spec, masks, mctx)
    trainer, result = ctx.fit("retrain", model, ctx.recipe.retrain, [EnforceMasks(masks)] if masks else [])
    save_artifact(trainer.model, spec, out, masks=masks)
    return training_summary(trainer, result)


def _compact(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    """Filter masks + ``compact: true`` → a physically smaller model; other masks are squashed
    into zeros (the shape stays); an already compacted or dense model passes through."""
    if source is None:  # no training and no pruning: the fresh model itself
        model, spec = ctx.fresh_model()
        save_artifact(model, spec, out)
        return {"compacted": False}
    model, spec, masks = _load(source)
    manifest, diff = None, None
    if masks is not None and masks.structured and ctx.recipe.compact:
        result = compact_masked(model, masks, ctx.example_input())
        model, manifest, diff = result.model, result.manifest, result.max_abs_diff
    elif masks is not None:
        masks.squash()
    save_artifact(model, spec, out, manifest=manifest)
    return {"compacted": manifest is not None or spec.manifest is not None, "max_abs_diff": diff,
            **ctx.measure(model)}


def _evaluate(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    from prunekit.measure.accuracy import evaluate
    from prunekit.measure.latency import measure_latency

    model, spec = load_artifact(ctx.run_dir / STAGE_DIRS["compact"])
    dense = ctx.dense_model()
    settings = ctx.recipe.evaluate
    result = evaluate(model.to(ctx.device), ctx.data.test, device=ctx.device, precision=settings.precision)
    model.to("cpu")
    layers = kept_fractions(dense, model)
    conv = [row for row in layers if row["type"] == "Conv2d"]
    total = sum(row["dense"] for row in conv)
    sparsity = 1 - sum(row["nonzero"] for row in conv) / total if total else 0.0
    write_json(out / "layers.json", layers)
    summary = {"test_acc": result.accuracy, "test_loss": result.loss, "test_samples": result.samples,
               "precision": settings.precision, "sparsity": sparsity,
               "sparsity_covers": f"conv weights removed or zero vs the dense model ({len(conv)} layers, "
                                  f"{total:,} weights, first conv included)",
               "macs": count_macs(model, ctx.input_shape).total, "dense_macs": count_macs(dense, ctx.input_shape).total,
               "params": count_params(model), "dense_params": count_params(dense)}
    if settings.latency:  # rank 0 alone: the ranks would share the CPU it times
        lat = ctx.ranks.broadcast(measure_latency(model, ctx.input_shape, batch_size=settings.latency_batch_size,
                                                  precision="fp32", channels_last=False, device=torch.device("cpu"))
                                  if ctx.ranks.is_main else None)
        summary["latency_ms"] = lat.median_ms
        summary["latency_batch_size"] = settings.latency_batch_size
    return summary


def _export(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    from prunekit.export import export_onnx

    if not ctx.ranks.is_main:  # rank 0 writes the file; the others take its summary
        return ctx.ranks.broadcast(None)
    model, _ = load_artifact(ctx.run_dir / STAGE_DIRS["compact"])
    path = export_onnx(model, ctx.example_input(), out / "model.onnx")
    return ctx.ranks.broadcast({"onnx": path.name, "bytes": path.stat().st_size})


STAGE_FUNCTIONS = {"train": _train, "prune": _prune, "retrain": _retrain, "compact": _compact,
                   "evaluate": _evaluate, "export": _export}


def kept_fractions(dense: nn.Module, model: nn.Module) -> list[dict[str, Any]]:
    """Per Conv/Linear layer: dense weight count, non-zero weights left, kept fraction."""
    modules = dict(model.named_modules())
    rows = []
    for name, layer in dense.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or name not in modules:
            continue
        weight = modules[name].weight.detach()
        nonzero = int((weight != 0).sum())
        rows.append({"layer": name, "type": type(layer).__name__, "dense": layer.weight.numel(),
                     "shape": list(weight.shape), "dense_shape": list(layer.weight.shape),
                     "nonzero": nonzero, "kept": nonzero / layer.weight.numel()})
    return rows


def result_row(markers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The store's result columns from the stage markers."""
    evaluation = markers.get("evaluate", {})
    final = evaluation.get("test_acc")
    last_training = next((markers[s] for s in ("retrain", "prune", "train")
                          if s in markers and markers[s].get("best_test_acc") is not None), None)
    best = max(final, last_training["best_test_acc"]) if last_training and final is not None else final
    return {
        "sparsity": evaluation.get("sparsity"), "sparsity_covers": evaluation.get("sparsity_covers"),
        "macs": evaluation.get("macs"), "dense_macs": evaluation.get("dense_macs"),
        "params": evaluation.get("params"), "dense_params": evaluation.get("dense_params"),
        "final_test_acc": final, "best_test_acc": best,
        "dense_test_acc": markers.get("train", {}).get("dense_test_acc"),
        "latency_ms": evaluation.get("latency_ms"),
        "wall_time_s": sum(m.get("wall_time_s") or 0.0 for m in markers.values()),
    }


