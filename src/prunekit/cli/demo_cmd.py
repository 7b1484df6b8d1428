"""``prunekit demo``: train, prune and fine-tune a small CNN on the bundled digits; no download."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from rich import box
from rich.table import Table

from prunekit.cli.common import add_device_argument, console
from prunekit.cli.parsing import fraction, positive_int
from prunekit.core.compaction import compact_masked
from prunekit.core.prune_once import prune_once
from prunekit.data import build_data
from prunekit.measure import count_macs, count_params
from prunekit.measure.accuracy import evaluate
from prunekit.measure.latency import measure_latency
from prunekit.models import build_model
from prunekit.train import TrainConfig, Trainer


@dataclass
class Row:
    label: str
    accuracy: float
    macs: int
    params: int
    latency_ms: float


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="train, prune and fine-tune a small CNN on bundled digits")
    parser.add_argument("--epochs", type=positive_int, default=15, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=positive_int, default=5)
    parser.add_argument("--remove", type=fraction, default=0.5, help="fraction of filters removed per conv")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = console()
    data = build_data("digits", batch_size=64, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("small_cnn", num_classes=data.num_classes, in_channels=data.input_shape[0])
    config = TrainConfig(epochs=args.epochs, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                         lr_plan="onecycle", seed=args.seed)
    out.print(f"1/3 training small_cnn on the bundled digits ({args.epochs} epochs)")
    trainer = Trainer(model, data.train, data.test, config, device=args.device)
    trainer.fit()
    rows = [_measure("dense", trainer, data)]

    out.print(f"2/3 removing {args.remove:.0%} of the filters of every conv (L1 norm) and compacting")
    example = torch.zeros(1, *data.input_shape, device=trainer.device)
    sparsifier = prune_once(trainer.model, example, target=f"filters={args.remove}", granularity="filter")
    compact_masked(trainer.model, sparsifier.mask_set, example)
    rows.append(_measure("pruned, no fine-tune", trainer, data))

    out.print(f"3/3 fine-tuning the compacted model ({args.finetune_epochs} epochs)")
    finetune = TrainConfig(epochs=args.finetune_epochs, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
                           lr_plan="cosine", seed=args.seed)
    tuner = Trainer(trainer.model, data.train, data.test, finetune, device=args.device)
    tuner.fit()
    rows.append(_measure("pruned + fine-tuned", tuner, data))
    out.print(_table(rows))
    return 0


def _measure(label: str, trainer: Trainer, data) -> Row:
    model = trainer.model
    accuracy = evaluate(model, data.test, device=trainer.device, precision="fp32").accuracy
    latency = measure_latency(model, data.input_shape, batch_size=32, precision="fp32", repeats=30)
    return Row(label, accuracy, count_macs(model, data.input_shape).total, count_params(model), latency.median_ms)


def _table(rows: list[Row]) -> Table:
    table = Table(title="prunekit demo: small_cnn on digits (test split, final epoch)", box=box.SIMPLE)
    for column in ("model", "test acc", "MACs", "× MACs", "params", "× params", "latency b32 fp32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    dense = rows[0]
    for row in rows:
        table.add_row(row.label, f"{row.accuracy:.1%}", f"{row.macs:,}", f"{row.macs / dense.macs:.2f}x",
                      f"{row.params:,}", f"{row.params / dense.params:.2f}x", f"{row.latency_ms:.2f} ms")
    return table
