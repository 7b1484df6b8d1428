"""``prunekit compact``: turn a filter-pruned model (zeros + masks) into a smaller module."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.cli.common import console, key_value_table
from prunekit.cli.prune_cmd import MASKS_NAME
from prunekit.core.compaction import compact
from prunekit.errors import UserError
from prunekit.measure import count_macs, count_params


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compact", help="physically remove the filters a `prune --no-compact` run zeroed")
    parser.add_argument("model_dir", type=Path, help="output directory of prunekit prune --no-compact")
    parser.add_argument("--out", type=Path, required=True, help="directory for the compacted model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, spec = load_artifact(args.model_dir)
    pruning = spec.metadata.get("pruning", {})
    if not (args.model_dir / MASKS_NAME).is_file() or pruning.get("granularity") not in ("filter", "channel"):
        raise UserError(f"model: {str(args.model_dir)!r} holds no filter masks; expected the output of "
                        "prunekit prune --granularity filter --no-compact")
    masks = load_file(str(args.model_dir / MASKS_NAME))
    keep = {name: mask.bool().nonzero().flatten() for name, mask in masks.items()}
    macs_before = count_macs(model, spec.input_shape).total
    result = compact(model, keep, torch.zeros(1, *spec.input_shape))
    save_artifact(result.model, ModelSpec(**spec.__dict__), args.out, manifest=result.manifest)
    macs_after, params = count_macs(result.model, spec.input_shape).total, count_params(result.model)
    console().print(key_value_table(f"compacted {spec.model}", [
        ("MACs", f"{macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.3f}x)"),
        ("params", f"{params:,}"), ("max |compacted - masked| output", f"{result.max_abs_diff:.2e}"),
        ("saved to", str(args.out))]))
    return 0
