"""``prunekit inspect``: the per-layer report of a saved (pruned or compacted) model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from prunekit.artifact import load_artifact
from prunekit.cli.common import console, key_value_table
from prunekit.cli.parsing import non_negative_int
from prunekit.core.report import compaction_report
from prunekit.measure.sparsity import weight_sparsity
from prunekit.models import build_model


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("inspect", help="per-layer shapes, kept fractions, MACs and latency of a saved model")
    parser.add_argument("model_dir", type=Path, help="directory with model.json + model.safetensors")
    parser.add_argument("--batch-size", type=non_negative_int, default=32, help="latency batch size")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=non_negative_int, default=30, help="timed runs (0 skips latency)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec = load_artifact(args.model_dir)
    out = console()
    dense = build_model(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    report = compaction_report(dense, model, spec.input_shape, batch_size=max(1, args.batch_size),
                               precision=args.precision, repeats=args.repeats)
    zeros = {name: float((m.weight == 0).float().mean()) for name, m in model.named_modules()
             if hasattr(m, "weight") and m.weight is not None and m.weight.dim() > 1}
    table = Table(title=f"{spec.model} ({'compacted' if spec.manifest else 'dense shapes'})")
    for column in ("layer", "type", "shape", "kept", "zeros", "MACs before", "MACs after"):
        table.add_column(column, justify="left" if column in ("layer", "type", "shape") else "right")
    for row in report.layers:
        shape = "x".join(map(str, row.shape_after))
        if row.shape_after != row.shape_before:
            shape = "x".join(map(str, row.shape_before)) + " -> " + shape
        table.add_row(row.name, row.type, shape, f"{row.kept:.2f}",
                      f"{zeros[row.name]:.2f}" if row.name in zeros else "", f"{row.macs_before:,}", f"{row.macs_after:,}")
    out.print(table)
    sparsity = weight_sparsity(model, covers="conv")
    rows = [("MACs", f"{report.macs_before:,} -> {report.macs_after:,} ({report.macs_after / report.macs_before:.3f}x)"),
            ("params", f"{report.params_before:,} -> {report.params_after:,}"),
            ("sparsity", sparsity.describe())]
    if report.speedup is not None:
        rows.append((f"latency b{report.latency_after.batch_size} {args.precision}",
                     f"{report.latency_before.median_ms:.2f} -> {report.latency_after.median_ms:.2f} ms, "
                     f"speed-up {report.latency.describe()}; MACs ratio {report.macs_ratio:.2f}x"))
    rows += [("hint", hint) for hint in report.hints]
    out.print(key_value_table("totals", rows))
    return 0
