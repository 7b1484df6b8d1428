"""A Trainer hook that renders training progress with rich (the CLI's, never the library's)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prunekit.train.hooks import Hook
from prunekit.train.trainer import EpochMetrics, Trainer

REFRESH_EVERY = 10  # steps between reads of the running loss (each read syncs the device)


class ProgressHook(Hook):
    """One bar over the whole run (loss, accuracy, images/s, ETA) and one line per epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None
        self.epoch_began = 0.0

    def on_train_begin(self, trainer: Trainer) -> None:
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} acc {task.fields[acc]} {task.fields[speed]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.global_step,
                                           epoch=f"{trainer.epoch + 1}/{trainer.total_epochs}",
                                           loss="-", acc="-", speed="-")
        self.progress.start()

    def on_epoch_begin(self, trainer: Trainer, epoch: int) -> None:
        self.epoch_began = time.perf_counter()
        self.progress.update(self.task, epoch=f"{epoch + 1}/{trainer.total_epochs}")

    def after_optimizer_step(self, trainer: Trainer) -> None:
        step_in_epoch = trainer.global_step % trainer.steps_per_epoch + 1
        if step_in_epoch % REFRESH_EVERY:
            self.progress.advance(self.task)
            return
        loss, acc, images = trainer.running.means()
        speed = images / max(time.perf_counter() - self.epoch_began, 1e-9)
        self.progress.update(self.task, advance=1, loss=f"{loss:.3f}", acc=f"{acc:.3f}", speed=f"{speed:.0f}")

    def on_epoch_end(self, trainer: Trainer, metrics: EpochMetrics) -> None:
        test = f"  test acc {metrics.test_acc:.4f}" if metrics.test_acc is not None else ""
        extras = "".join(f"  {key.replace('_', ' ')} {value:.4g}" for key, value in metrics.extra.items()
                         if "/" not in key and isinstance(value, (int, float)) and not isinstance(value, bool))
        self.console.print(
            f"epoch {metrics.epoch}/{trainer.total_epochs}  loss {metrics.train_loss:.4f}  "
            f"train acc {metrics.train_acc:.4f}{test}  {metrics.images_per_s:.0f} img/s  "
            f"lr {metrics.lr:.2e}  {metrics.epoch_time_s:.0f} s{extras}"
        )

    def on_train_end(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
