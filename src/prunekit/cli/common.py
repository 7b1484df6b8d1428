"""Arguments and rendering shared by several subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prunekit.cli.parsing import positive_int
from prunekit.distributed import current
from prunekit.errors import UserError
from prunekit.train.config import LR_SCALING


def add_data_arguments(parser: argparse.ArgumentParser, *, default_batch: int = 128) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default="cifar10", help="data set: cifar10, cifar100, digits, imagefolder")
    group.add_argument("--data-dir", default=None,
                       help="directory holding the data (default: $PRUNEKIT_DATA, else ./data)")
    group.add_argument("--batch-size", type=positive_int, default=default_batch)
    group.add_argument("--subset", type=positive_int, default=None,
                       help="use only the first N training images (and N/5 test images)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a torchrun launch (``torchrun --nproc-per-node N -m prunekit ...``)."""
    group = parser.add_argument_group("torchrun (several processes)")
    group.add_argument("--scale-lr", choices=LR_SCALING, default=None,
                       help="batches are per rank, so the global batch grows with the world size; "
                            "linear multiplies the LR by it (default none; a resume keeps the run's)")
    group.add_argument("--sync-batchnorm", action="store_true", default=None,
                       help="BatchNorm statistics over the global batch (CUDA only)")


def launch_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields a launch sets and the user gave: ``scale_lr``, ``sync_batchnorm``."""
    given = {"scale_lr": args.scale_lr, "sync_batchnorm": args.sync_batchnorm}
    return {key: value for key, value in given.items() if value is not None}


def launch_line(batch_size: int, launch: dict) -> str | None:
    """The line that states a torchrun launch's world size, batches and LR rule (None: one process)."""
    ranks = current()
    if not ranks.distributed:
        return None
    return (f"torchrun: {ranks.world_size} processes, batch {batch_size} per rank = {batch_size * ranks.world_size} "
            f"global, LR scaling {launch.get('scale_lr', 'none')}"
            f"{', SyncBatchNorm' if launch.get('sync_batchnorm') else ''}")


def console() -> Console:
    """Rich console; when the output is not a terminal (logs, CI) tables get 120 columns, not 80,
    and lines are never wrapped (a long path stays one line for grep and copy). Under torchrun
    only rank 0 prints."""
    terminal = sys.stdout.isatty()
    return Console(highlight=False, width=None if terminal else 120, soft_wrap=not terminal,
                   quiet=not current().is_main)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


PLOT_FORMATS = ("png", "pdf", "svg")


def check_plot_path(path: Path) -> str:
    """The plot format named by ``path``'s suffix, or a one-line error naming --plot."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise UserError(f"--plot: expected a file name ending in {', '.join('.' + f for f in PLOT_FORMATS)}, "
                        f"got {str(path)!r}")
    return fmt
