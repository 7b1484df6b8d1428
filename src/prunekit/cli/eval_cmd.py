"""``prunekit eval``: test accuracy of a saved model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.artifact import load_artifact
from prunekit.cli.common import add_device_argument, console, key_value_table
from prunekit.cli.parsing import positive_int
from prunekit.data import build_data
from prunekit.device import resolve_device, resolve_precision
from prunekit.errors import UserError
from prunekit.measure.accuracy import evaluate


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="measure the test accuracy of a saved model")
    parser.add_argument("model_dir", type=Path, help="directory with model.json + model.safetensors")
    parser.add_argument("--data", default=None, help="data set (default: the one the model was trained on)")
    parser.add_argument("--data-dir", default=None, help="directory holding the data")
    parser.add_argument("--batch-size", type=positive_int, default=512)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="fp32")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec = load_artifact(args.model_dir)
    data_name = args.data or spec.data or "cifar10"
    data = build_data(data_name, data_dir=args.data_dir, batch_size=args.batch_size,
                      test_batch_size=args.batch_size, augment=False)
    if tuple(data.input_shape) != tuple(spec.input_shape) or data.num_classes != spec.num_classes:
        raise UserError(f"--data: the model takes {'x'.join(map(str, spec.input_shape))} inputs with "
                        f"{spec.num_classes} classes ({spec.data or 'its data set'}); {data_name} has "
                        f"{'x'.join(map(str, data.input_shape))} inputs with {data.num_classes} classes")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    result = evaluate(model.to(device), data.test, device=device, precision=precision)
    report = {"model": spec.model, "data": data_name, "test_acc": result.accuracy, "test_loss": result.loss,
              "samples": result.samples, "precision": precision}
    if args.json:
        print(json.dumps(report))
    else:
        console().print(key_value_table(f"{spec.model} on {data_name}", [
            ("test accuracy", f"{result.accuracy:.4f}"), ("test loss", f"{result.loss:.4f}"),
            ("images", str(result.samples)), ("precision", precision)]))
    return 0
