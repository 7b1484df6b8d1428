"""Metric loggers behind one small interface: CSV + JSONL always, TensorBoard and MLflow when installed.

A :class:`MetricLogger` receives the run's parameters once and one row per epoch of every
training stage. :class:`FileLogger` keeps ``metrics.jsonl`` and ``metrics.csv`` of the whole run
(all stages, a ``stage`` column) in the run directory; rows are keyed by (stage, epoch) and the
files rewritten atomically, so a resumed run never duplicates an epoch. TensorBoard
(``tensorboard`` package) and MLflow (``mlflow`` package) are optional: asked for but not
installed, they are skipped with a warning; nothing in prunekit requires them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from prunekit.io import atomic_open
from prunekit.train.hooks import Hook

if TYPE_CHECKING:
    from prunekit.train.trainer import EpochMetrics, Trainer

log = logging.getLogger(__name__)

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"


class MetricLogger:
    """Receives a run's parameters and per-epoch metrics; override what you need."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_epoch(self, stage: str, row: dict[str, Any], step: int) -> None:
        """``row``: the epoch's metrics (flat); ``step``: epochs completed over the whole run."""

    def close(self) -> None: ...


class FileLogger(MetricLogger):
    """``metrics.jsonl`` + ``metrics.csv`` over all stages of a run (always on)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        path = self.run_dir / METRICS_JSONL
        if path.is_file():  # a resumed run: keep what earlier sessions logged
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[(row["stage"], row["epoch"])] = row

    def log_epoch(self, stage: str, row: dict[str, Any], step: int) -> None:
        self.rows[(stage, int(row["epoch"]))] = {"stage": stage, "step": step, **row}
        self._write()

    def _write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: r["step"])
        with atomic_open(self.run_dir / METRICS_JSONL) as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_open(self.run_dir / METRICS_CSV) as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


class TensorBoardLogger(MetricLogger):
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_epoch(self, stage: str, row: dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(f"{stage}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowLogger(MetricLogger):
    """Logs into the active MLflow tracking URI (``MLFLOW_TRACKING_URI``, else ./mlruns)."""

    def __init__(self, experiment: str, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_epoch(self, stage: str, row: dict[str, Any], step: int) -> None:
        metrics = {f"{stage}.{k}": float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


OPTIONAL = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""Recipe logger name -> the package it needs."""


def build_loggers(names: Sequence[str], run_dir: Path, *, experiment: str, run_name: str) -> list[MetricLogger]:
    """The file logger plus each optional one asked for whose package is importable."""
    loggers: list[MetricLogger] = [FileLogger(run_dir)]
    for name in names:
        package = OPTIONAL[name]
        if importlib.util.find_spec(package) is None:
            log.warning("logger %s skipped: the %s package is not installed (pip install %s)", name, package, package)
            continue
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
        else:
            loggers.append(MLflowLogger(experiment, run_name))
    return loggers


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (for parameter logging)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class LoggerHook(Hook):
    """Trainer hook: hands every epoch of one stage to the loggers (step = epochs before + epoch)."""

    def __init__(self, loggers: Sequence[MetricLogger], stage: str, epochs_before: int = 0) -> None:
        self.loggers, self.stage, self.epochs_before = list(loggers), stage, epochs_before

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        row = asdict(metrics)
        extra = row.pop("extra") or {}
        row.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool)) or v is None})
        for logger in self.loggers:
            logger.log_epoch(self.stage, row, self.epochs_before + metrics.epoch)
