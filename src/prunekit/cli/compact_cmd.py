"""``prunekit compact``: turn a filter-masked model (``prune --no-compact``, or a recipe stage's
masked model) into a physically smaller module."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.artifact import load_artifact, load_masks, save_artifact
from prunekit.cli.common import console, key_value_table
from prunekit.core.compaction import compact_masked
from prunekit.errors import UserError
from prunekit.measure import count_macs, count_params


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compact", help="physically remove the filters a masked model zeroed")
    parser.add_argument("model_dir", type=Path, help="a masked model: prunekit prune --no-compact, or a run's stage")
    parser.add_argument("--out", type=Path, required=True, help="directory for the compacted model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec = load_artifact(args.model_dir)
    masks = load_masks(model, spec, args.model_dir)
    if masks is None or not masks.structured:
        what = "no masks" if masks is None else f"{masks.granularity} masks, which leave zeros in place"
        raise UserError(f"model: {str(args.model_dir)!r} holds no filter masks ({what}); expected "
                        "(prunekit prune --granularity filter --no-compact, or a recipe run's prune/retrain stage)")
    macs_before = count_macs(model, spec.input_shape).total
    result = compact_masked(model, masks, spec.example_input())
    save_artifact(result.model, spec, args.out, manifest=result.manifest)
    macs_after, params = count_macs(result.model, spec.input_shape).total, count_params(result.model)
    console().print(key_value_table(f"compacted {spec.model}", [
        ("MACs", f"{macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.3f}x)"),
        ("params", f"{params:,}"), ("max |compacted - masked| output", f"{result.max_abs_diff:.2e}"),
        ("saved to", str(args.out))]))
    return 0
