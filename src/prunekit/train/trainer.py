"""The one training loop every method uses; methods plug in as hooks."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from prunekit.data.loader import BatchLoader
from prunekit.device import autocast, resolve_device, resolve_precision, use_channels_last
from prunekit.core.compaction import CompactionResult, compact_masked
from prunekit.core.masks import MaskSet
from prunekit.distributed import SINGLE, DistContext, current
from prunekit.errors import UserError
from prunekit.io import atomic_open
from prunekit.measure.accuracy import evaluate
from prunekit.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from prunekit.train.config import TrainConfig
from prunekit.train.hooks import Hook
from prunekit.train.lr_plans import LRPlan, build_lr_plan
from prunekit.train.optim import build_optimizer, frozen_parameters, set_lr_and_momentum
from prunekit.train.parallel import check_sharded, from_sync_batchnorm, to_sync_batchnorm, wrap

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoints/last.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class EpochMetrics:
    """What one epoch produced; hooks may add entries to ``extra`` in ``on_epoch_end``."""

    epoch: int
    train_loss: float
    train_acc: float
    lr: float
    images_per_s: float
    epoch_time_s: float
    test_loss: float | None = None
    test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    final_test_acc: float | None
    best_test_acc: float | None
    best_epoch: int | None
    history: list[EpochMetrics]
    wall_time_s: float

    def summary(self) -> dict[str, Any]:
        """Final-epoch accuracy first; best-epoch only as the optimistic secondary figure."""
        return {"final_test_acc": self.final_test_acc, "best_test_acc_optimistic": self.best_test_acc,
                "best_epoch": self.best_epoch, "epochs": len(self.history), "wall_time_s": self.wall_time_s}


class RunningStats:
    """Loss and accuracy sums of the current epoch, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        count = labels.numel()
        self.totals[0] += loss.detach().double() * count
        self.totals[1] += (logits.detach().argmax(1) == labels).sum()
        self.totals[2] += count

    def means(self, dist: DistContext = SINGLE) -> tuple[float, float, int]:
        """Means over this rank's batches, or over every rank's with the launch's ``dist``."""
        loss_sum, correct, count = dist.sum(self.totals).tolist()
        count = max(count, 1)
        return loss_sum / count, correct / count, int(count)


class Trainer:
    """Trains ``model`` on ``train`` batches, evaluates on ``test``, checkpoints into ``run_dir``.

    Hook points are listed in :mod:`prunekit.train.hooks`. The LR plan is applied before every
    optimizer step. With a ``run_dir``, each epoch ends with an atomic checkpoint and a metrics
    JSONL; ``fit(resume=True)`` continues a killed run from its last checkpoint exactly.
    The budget is ``total_steps`` optimizer steps over ``total_epochs`` epochs (the config's
    ``steps``, or ``epochs`` full passes); a step budget may end inside the last epoch, which is
    still evaluated and recorded.

    Under torchrun (an initialised process group, :func:`prunekit.distributed.current`) ``fit``
    trains the model under DistributedDataParallel: ``train`` must be this rank's shard, metrics
    are summed over ranks, and only rank 0 writes. ``model`` stays the plain module (hooks see
    it); :meth:`compact` removes channels mid-run on every rank alike.
    """

    def __init__(self, model: nn.Module, train: BatchLoader, test: BatchLoader | None,
                 config: TrainConfig, *, hooks: Sequence[Hook] = (), run_dir: str | Path | None = None,
                 device: str | torch.device = "auto", dist: DistContext | None = None,
                 lr_plan: LRPlan | None = None) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.precision = resolve_precision(config.precision, self.device)
        self.channels_last = use_channels_last(config.channels_last, self.device, self.precision)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.train_loader, self.test_loader = train, test
        self.hooks = list(hooks)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = dist if dist is not None else current()
        for loader in (train, test):
            check_sharded(loader, self.dist)
        self.lr_scale = self.dist.world_size if config.scale_lr == "linear" else 1
        self.ddp: nn.Module | None = None  # the DDP wrapper while fit runs under torchrun
        self.steps_per_epoch = len(train)
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader yields no batch")
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.frozen = frozen_parameters(self.model, config.trainable)
        self.optimizer = build_optimizer(self.model, config, self.frozen)
        self.lr_plan = lr_plan or build_lr_plan(config.lr_plan, lr=config.lr * self.lr_scale, epochs=self.total_epochs,
                                                steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                                                **config.lr_plan_args)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.history: list[EpochMetrics] = []
        self.wall_time_s = 0.0  # summed over sessions of a resumed run
        self.running = RunningStats(self.device)

    @property
    def progress(self) -> float:
        """Fraction of the training budget done, in [0, 1] (what schedules are functions of)."""
        return self.global_step / self.total_steps

    # ----------------------------------------------------------------- the loop
    def fit(self, resume: bool = True) -> TrainResult:
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_state(load_checkpoint(self.checkpoint_path))
            log.info("resumed from %s at epoch %d", self.checkpoint_path, self.epoch)
        else:
            torch.manual_seed(self.config.seed)
        for param in self.frozen:
            param.requires_grad_(False)
        synced = self._begin_parallel()
        try:
            self._call("on_train_begin")
            while self.epoch < self.total_epochs:
                began = time.perf_counter()
                metrics = self._train_epoch(self.epoch)
                if (self.epoch + 1) % self.config.eval_every == 0 or self.epoch + 1 == self.total_epochs:
                    self._evaluate_into(metrics)
                self.epoch += 1
                self._call("on_epoch_end", metrics)
                self.history.append(metrics)
                self.wall_time_s += time.perf_counter() - began
                self._persist()
                log.info("epoch %d/%d %s", metrics.epoch, self.total_epochs, _brief(metrics))
            self._call("on_train_end")
        finally:
            self.ddp = None
            from_sync_batchnorm(self.model, synced)
            for param in self.frozen:
                param.requires_grad_(True)
        return self._result()

    def _begin_parallel(self) -> dict[str, type[nn.Module]]:
        """Under torchrun: log the launch, swap in SyncBatchNorm if asked, wrap the model in DDP."""
        if not self.dist.distributed:
            return {}
        batch = getattr(self.train_loader, "batch_size", None)
        log.info("distributed: world size %d, batch %s per rank, global batch %s, LR scaling %s (lr %g)",
                 self.dist.world_size, batch, batch * self.dist.world_size if batch else "?",
                 self.config.scale_lr, self.config.lr * self.lr_scale)
        synced = to_sync_batchnorm(self.model, self.device) if self.config.sync_batchnorm else {}
        self.ddp = wrap(self.model, self.dist, self.device)
        return synced

    def compact(self, masks: MaskSet, example_input: torch.Tensor) -> CompactionResult:
        """Remove the filters ``masks`` pruned from the model in training, re-binding the optimizer
        (state sliced alike) and, under torchrun, rebuilding the DDP wrapper; every rank calls it."""
        result = compact_masked(self.model, masks, example_input.to(self.device), optimizer=self.optimizer)
        if self.ddp is not None:
            self.ddp = wrap(self.model, self.dist, self.device)
        return result

    def check_identical(self, what: str, checksum: torch.Tensor) -> None:
        """Under torchrun, stop unless every rank holds the same ``checksum`` of ``what``."""
        self.dist.check_identical(what, checksum)

    def _train_epoch(self, epoch: int) -> EpochMetrics:
        self.model.train(not self.config.eval_mode)
        self.train_loader.set_epoch(epoch)
        self.running = RunningStats(self.device)
        self._call("on_epoch_begin", epoch)
        began = time.perf_counter()
        for images, labels in self.train_loader:
            self._train_step(images, labels)
            if self.global_step >= self.total_steps:
                break
        loss, acc, count = self.running.means(self.dist)
        elapsed = time.perf_counter() - began
        return EpochMetrics(epoch=epoch + 1, train_loss=loss, train_acc=acc,
                            lr=self.optimizer.param_groups[0]["lr"], images_per_s=count / elapsed,
                            epoch_time_s=elapsed)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        self._call("on_step_begin")
        with autocast(self.device, self.precision):
            logits = (self.ddp or self.model)(images)
            loss = self.criterion(logits.float(), labels)
            for hook in self.hooks:
                term = hook.extra_loss(self, logits, labels)
                if term is not None:
                    loss = loss + term
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step = min(self.global_step, self.total_steps - 1)
        set_lr_and_momentum(self.optimizer, self.lr_plan.lr(step), self.lr_plan.momentum(step))
        self._call("before_optimizer_step")
        self.optimizer.step()
        self._call("after_optimizer_step")
        loss = loss.detach()
        self.running.add(loss, logits, labels)
        self._call("on_step_end", loss)
        self.global_step += 1

    def _evaluate_into(self, metrics: EpochMetrics) -> None:
        if self.test_loader is None:
            return
        self.dist.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics everywhere
        result = evaluate(self.model, self.test_loader, device=self.device, precision=self.precision,
                          channels_last=self.channels_last, dist=self.dist)
        metrics.test_loss, metrics.test_acc = result.loss, result.accuracy
        self._call("on_evaluate", metrics)

    def _call(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    # ------------------------------------------------------------- persistence
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng(),
            "hooks": {key: state for key, hook in self._keyed_hooks().items() if (state := hook.state_dict())},
            "history": [asdict(m) for m in self.history],
            "wall_time_s": self.wall_time_s,
            "world_size": self.dist.world_size,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise UserError(f"resume: the checkpoint was written by a run of {saved_world} process(es), this launch "
                            f"has {self.dist.world_size}; resume with the same number of processes (the data "
                            "shards and the global batch depend on it)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = dict(state["hooks"])
        for key, hook in self._keyed_hooks().items():
            if key in saved:
                hook.load_state_dict(saved.pop(key))
        if saved:
            raise ValueError(f"checkpoint holds state for hooks this run lacks: {', '.join(saved)}")
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.wall_time_s = state["wall_time_s"]
        restore_rng(state["rng"])

    def _keyed_hooks(self) -> dict[str, Hook]:
        """Hooks by class name (numbered when a class appears twice), the key of their saved state."""
        keyed: dict[str, Hook] = {}
        for hook in self.hooks:
            name = type(hook).__qualname__
            key, n = name, 1
            while key in keyed:
                n += 1
                key = f"{name}#{n}"
            keyed[key] = hook
        return keyed

    def _persist(self) -> None:
        if self.run_dir is None:
            return
        self.dist.broadcast_buffers(self.model)
        if not self.dist.is_main:
            return
        save_checkpoint(self.checkpoint_path, self.state_dict())
        with atomic_open(self.run_dir / METRICS_NAME) as handle:
            for metrics in self.history:
                handle.write(json.dumps(asdict(metrics)) + "\n")

    def _result(self) -> TrainResult:
        evaluated = [m for m in self.history if m.test_acc is not None]
        best = max(evaluated, key=lambda m: m.test_acc, default=None)
        final = self.history[-1].test_acc if self.history else None
        return TrainResult(final_test_acc=final, best_test_acc=best.test_acc if best else None,
                           best_epoch=best.epoch if best else None, history=self.history,
                           wall_time_s=self.wall_time_s)


def _brief(metrics: EpochMetrics) -> str:
    test = f" test_acc={metrics.test_acc:.4f}" if metrics.test_acc is not None else ""
    return f"loss={metrics.train_loss:.4f} acc={metrics.train_acc:.4f}{test} {metrics.images_per_s:.0f} img/s"
