"""``prunekit macs``: MACs (thop convention) and parameters of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from prunekit.artifact import SPEC_NAME, load_artifact
from prunekit.cli.common import console, key_value_table
from prunekit.cli.parsing import input_shape, positive_int
from prunekit.errors import UserError
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("macs", help="count MACs (thop convention) and parameters")
    parser.add_argument("model", help="registered model name, tv:<torchvision name>, or a saved model directory")
    parser.add_argument("--input", type=input_shape, default=None, help="input shape CxHxW (default 3x32x32)")
    parser.add_argument("--num-classes", type=positive_int, default=10)
    parser.add_argument("--per-layer", action="store_true", help="also list every counted layer")
    parser.add_argument("--json", action="store_true", help="print JSON with macs, params, by_type")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (Path(args.model) / SPEC_NAME).is_file():
        model, spec = load_artifact(args.model)
        shape = args.input or spec.input_shape
        if args.input and args.input[0] != spec.in_channels:
            raise UserError(f"--input: {args.model} takes {spec.in_channels} input channels, got "
                            f"{'x'.join(map(str, shape))}")
    else:
        shape = args.input or (3, 32, 32)
        model = build_model(args.model, num_classes=args.num_classes, in_channels=shape[0])
    try:
        report = count_macs(model, shape)
    except RuntimeError as err:  # the layers cannot run on that input (too small, ...)
        raise UserError(f"--input: {args.model} cannot run on {'x'.join(map(str, shape))}: "
                        f"{str(err).splitlines()[0]}") from err
    params = count_params(model)
    if args.json:
        payload = {"model": args.model, "input": list(shape), "macs": report.total, "params": params,
                   "by_type": report.by_type}
        if args.per_layer:
            payload["layers"] = [{"name": row.name, "type": row.type, "macs": row.macs} for row in report.rows]
        print(json.dumps(payload))
        return 0
    out = console()
    if args.per_layer:
        table = Table(title="per layer")
        for column in ("layer", "type", "MACs"):
            table.add_column(column, justify="right" if column == "MACs" else "left")
        for row in report.rows:
            table.add_row(row.name, row.type, f"{row.macs:,}")
        out.print(table)
    out.print(key_value_table(f"{args.model} @ {'x'.join(map(str, shape))}", [
        ("MACs", f"{report.total:,}"), ("params", f"{params:,}"),
        *((f"  {kind}", f"{macs:,}") for kind, macs in report.by_type.items())]))
    return 0
