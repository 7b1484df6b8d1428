"""The stages of one run, in order: train → prune → retrain → compact → evaluate → export.

Each stage reads what the previous one wrote in the run directory, writes its own output into
its folder, and last a ``stage.json`` marker with its summary. A stage whose marker exists is
skipped, so a resumed run continues at the first unfinished stage; a training stage also
resumes from its own ``checkpoints/last.pt`` (exactly, see the Trainer). Models always pass
between stages through disk (``model.json`` + ``model.safetensors``, masks in
``masks.safetensors``), so an interrupted and an uninterrupted run follow the same path.

    RUN_DIR/
      recipe.yaml  run.json  result.json  metrics.jsonl  metrics.csv
      train/    checkpoints/last.pt  metrics.jsonl  model.*  stage.json     dense model
      prune/    model.*  masks.safetensors  stage.json  (+ checkpoints/ for gradual methods)
      retrain/  checkpoints/last.pt  metrics.jsonl  model.*  masks.safetensors  stage.json
      final/    model.*  stage.json                 the compacted (or mask-squashed) final model
      evaluate/ layers.json  stage.json             accuracy, MACs, params, sparsity, per layer
      export/   model.onnx  stage.json
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.data import DataBundle, build_data
from prunekit.device import resolve_device
from prunekit.experiment.loggers import LoggerHook, MetricLogger
from prunekit.experiment.recipe import Recipe
from prunekit.experiment.schema import TrainSpec
from prunekit.io import atomic_path, write_json
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model
from prunekit.train.hooks import Hook
from prunekit.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

STAGES = ("train", "prune", "retrain", "compact", "evaluate", "export")
STAGE_DIRS = {"train": "train", "prune": "prune", "retrain": "retrain", "compact": "final",
              "evaluate": "evaluate", "export": "export"}
MARKER = "stage.json"
MASKS = "masks.safetensors"

HooksFor = Callable[[str], Sequence[Hook]]
"""Extra Trainer hooks for a training stage (the CLI's progress bar)."""
Events = Callable[[str, str, dict[str, Any]], None]
"""``(stage, event, info)`` with event ``start``, ``skip`` or ``done``."""


class StageContext:
    """What stages share within one run: the recipe (one seed), the run directory, data, device."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, loggers: Sequence[MetricLogger] = (),
                 hooks_for: HooksFor | None = None, events: Events | None = None) -> None:
        self.recipe = recipe
        self.seed = recipe.seeds[0]
        self.run_dir = Path(run_dir)
        self.device = resolve_device(recipe.device)
        self.loggers = list(loggers)
        self.hooks_for = hooks_for or (lambda stage: ())
        self.events = events or (lambda stage, event, info: None)

    # ------------------------------------------------------------------ data
    @cached_property
    def data(self) -> DataBundle:
        d = self.recipe.data
        return build_data(d.name, data_dir=d.data_dir, batch_size=d.batch_size, test_batch_size=d.test_batch_size,
                          seed=self.seed, augment=d.augment, subset=d.subset, download=d.download)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)

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
            model = self.recipe.prune.prepare_model(model)
        return model, self.model_spec()

    def load_model(self, directory: Path) -> tuple[nn.Module, ModelSpec]:
        """A stage's model; with masks (``masks.safetensors``) re-attached and enforced."""
        model, spec = load_artifact(directory)
        masks = directory / MASKS
        if masks.is_file():
            attach_masks(model, load_file(str(masks)))
        return model, spec

    def save_model(self, model: nn.Module, spec: ModelSpec, directory: Path, *,
                   masks: dict[str, torch.Tensor] | None = None, manifest=None, granularity: str | None = None) -> None:
        model = model.to("cpu")
        if masks:
            with atomic_path(directory / MASKS) as tmp:
                save_file({n: m.detach().to("cpu", torch.uint8).contiguous() for n, m in masks.items()}, str(tmp),
                          metadata={"granularity": granularity or "weight"})
        save_artifact(model, spec, directory, manifest=manifest)

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 on the test split at the recipe's evaluation precision (the model stays on the CPU)."""
        from prunekit.measure.accuracy import evaluate

        result = evaluate(model.to(self.device), self.data.test, device=self.device,
                          precision=self.recipe.evaluate.precision)
        model.to("cpu")
        return result.accuracy

    def measure(self, model: nn.Module) -> dict[str, int]:
        return {"macs": count_macs(model, self.input_shape).total, "params": count_params(model)}

    # -------------------------------------------------------------- training
    def fit(self, stage: str, model: nn.Module, spec: TrainSpec, hooks: Sequence[Hook]) -> tuple[Trainer, TrainResult]:
        """Train ``model`` in the stage's folder, resuming from its checkpoint when there is one."""
        run_dir = self.run_dir / STAGE_DIRS[stage]
        before = sum(s.epochs for name, s in self.recipe.phases() if STAGES.index(name) < STAGES.index(stage))
        hooks = [*hooks, LoggerHook(self.loggers, stage, before), *self.hooks_for(stage)]
        trainer = Trainer(model, self.data.train, self.data.test, spec.config(self.seed), hooks=hooks,
                          run_dir=run_dir, device=self.device)
        return trainer, trainer.fit(resume=True)

    def training_summary(self, trainer: Trainer, result: TrainResult) -> dict[str, Any]:
        return {"final_test_acc": result.final_test_acc, "best_test_acc": result.best_test_acc,
                "best_epoch": result.best_epoch, "epochs": len(result.history),
                "steps_per_epoch": trainer.steps_per_epoch, "trainer_wall_time_s": result.wall_time_s,
                "precision": trainer.precision}


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor], coupled_input: torch.Tensor | None = None):
    """Re-attach saved weight masks to ``model`` as a Sparsifier (enforced at once); returns it.

    With ``coupled_input`` (filter masks) the tensors coupled to pruned filters (BN affine,
    consumers' inputs) are masked too, so training keeps the model equal to its compacted form.
    """
    from prunekit.core.sparsifier import Sparsifier

    names = sorted(masks)
    granularity = "filter" if coupled_input is not None else "weight"
    sparsifier = Sparsifier(model, granularity, "l1", layers=names, include_first_conv=True, include_classifier=True)
    sparsifier.load_state_dict({"masks": {n: m.bool() for n, m in masks.items()},
                                "generator": sparsifier.generator.get_state()})
    if coupled_input is not None:
        sparsifier.couple_channels(model, coupled_input)
    return sparsifier


def mask_granularity(directory: Path) -> str | None:
    path = directory / MASKS
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("granularity", "weight")


# ---------------------------------------------------------------------- the stages
def read_json(path: Path) -> Any:
    """The JSON document at ``path``, or None when there is none."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
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
        marker = done(ctx, stage)
        if marker is not None:
            ctx.events(stage, "skip", marker)
            log.info("stage %s already done in %s", stage, ctx.run_dir)
            markers[stage] = marker
            continue
        ctx.events(stage, "start", {})
        began = time.perf_counter()
        out = ctx.run_dir / STAGE_DIRS[stage]
        out.mkdir(parents=True, exist_ok=True)
        summary = STAGE_FUNCTIONS[stage](ctx, model_source(ctx, stage), out)
        elapsed = time.perf_counter() - began
        # a training stage's own clock spans every session of a resumed run; others take this session's
        summary = {"stage": stage, **summary,
                   "wall_time_s": summary.pop("trainer_wall_time_s", None) or elapsed}
        write_json(out / MARKER, summary)
        ctx.events(stage, "done", summary)
        markers[stage] = summary
    return markers


def _train(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    spec = ctx.recipe.train
    if spec.checkpoint:
        model, saved = load_artifact(spec.checkpoint)
        ctx.save_model(model, saved, out)
        return {"checkpoint": spec.checkpoint, "dense_test_acc": ctx.test_accuracy(model)}
    from prunekit.methods.retraining import RecordRewindPoints

    model, mspec = ctx.fresh_model()
    rewind = ctx.recipe.rewind_epochs()
    trainer, result = ctx.fit("train", model, spec, [RecordRewindPoints(rewind)] if rewind else [])
    ctx.save_model(trainer.model, mspec, out)
    # measured like the final model (evaluate.precision), so the two accuracies compare
    return {**ctx.training_summary(trainer, result), "dense_test_acc": ctx.test_accuracy(trainer.model)}


def _prune(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    return ctx.recipe.prune.run(ctx, source, out)


def _retrain(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    from prunekit.core.sparsifier import EnforceMasks

    model, spec = load_artifact(source)
    hooks: list[Hook] = []
    masks = load_file(str(source / MASKS)) if (source / MASKS).is_file() else None
    if masks is not None:
        structured = mask_granularity(source) in ("filter", "channel")
        hooks.append(EnforceMasks(attach_masks(model, masks, ctx.example_input() if structured else None)))
    rewind_epoch = ctx.recipe.rewind_epoch()
    if rewind_epoch is not None:  # weight rewinding: the surviving weights as the original run had them
        from prunekit.methods.retraining import load_rewind_point, rewind_weights_from_spec

        origin = ctx.recipe.train.checkpoint or ctx.run_dir / STAGE_DIRS["train"]
        rewind_weights_from_spec(model, load_rewind_point(origin, rewind_epoch), spec)
        for hook in hooks:  # the tensors coupled to pruned filters (BN, consumer inputs) back to zero
            hook.sparsifier.enforce()
    trainer, result = ctx.fit("retrain", model, ctx.recipe.retrain, hooks)
    ctx.save_model(trainer.model, spec, out, masks=masks, granularity=mask_granularity(source))
    return ctx.training_summary(trainer, result)


def _compact(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    """Structured masks + ``compact: true`` → a physically smaller model; other masks are squashed
    into zeros (the shape stays); an already compacted or dense model passes through."""
    from prunekit.core.compaction import compact

    if source is None:  # no training and no pruning: the fresh model itself
        model, spec = ctx.fresh_model()
        ctx.save_model(model, spec, out)
        return {"compacted": False}
    model, spec = load_artifact(source)
    granularity = mask_granularity(source)
    manifest, diff = None, None
    if granularity is not None:
        sparsifier = attach_masks(model, load_file(str(source / MASKS)))
        structured = granularity in ("filter", "channel")
        if structured and ctx.recipe.compact:
            keep = {name: mask.flatten(1).any(1).nonzero().flatten() for name, mask in sparsifier.masks().items()}
            sparsifier.squash()
            result = compact(model, keep, ctx.example_input())
            model, manifest, diff = result.model, result.manifest, result.max_abs_diff
        else:
            sparsifier.squash()
    ctx.save_model(model, spec, out, manifest=manifest)
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
    if settings.latency:
        lat = measure_latency(model, ctx.input_shape, batch_size=settings.latency_batch_size, precision="fp32",
                              channels_last=False, device=torch.device("cpu"))
        summary["latency_ms"] = lat.median_ms
        summary["latency_batch_size"] = settings.latency_batch_size
    return summary


def _export(ctx: StageContext, source: Path | None, out: Path) -> dict[str, Any]:
    from prunekit.export import export_onnx

    model, _ = load_artifact(ctx.run_dir / STAGE_DIRS["compact"])
    path = export_onnx(model, ctx.example_input(), out / "model.onnx")
    return {"onnx": path.name, "bytes": path.stat().st_size}


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


