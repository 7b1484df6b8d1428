"""``prunekit prune``: one-shot pruning of a saved model to a target with a unit, or with a
predefined filter configuration (``--config``, Network Pruning That Matters)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from prunekit.artifact import ModelSpec, load_artifact, save_artifact
from prunekit.cli.common import console, key_value_table
from prunekit.cli.parsing import positive_int
from prunekit.core.granularity import GRANULARITIES
from prunekit.core.importance import CRITERIA
from prunekit.core.oneshot import OneShotResult, prune_once
from prunekit.errors import UserError
from prunekit.io import atomic_path, write_json
from prunekit.measure import count_macs, count_params
from prunekit.measure.sparsity import weight_sparsity
from prunekit.methods.filter_configs import FILTER_CONFIGS

MASKS_NAME = "masks.safetensors"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prune", help="prune a saved model once to a target (weights=, filters= or macs=)")
    parser.add_argument("model_dir", type=Path, help="directory with model.json + model.safetensors")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="fraction removed with its unit: weights=0.9, filters=0.5, macs=0.5")
    what.add_argument("--config", choices=FILTER_CONFIGS.names(), metavar="NAME",
                      help="a predefined filter configuration instead of a target (METHODS §2.3.1): "
                           f"{', '.join(FILTER_CONFIGS.names())}; with --criterion l1 or random")
    parser.add_argument("--granularity", default="filter", help=f"one of {', '.join(GRANULARITIES.names())} or nm:N:M")
    parser.add_argument("--criterion", default="l1", help=f"one of {', '.join(CRITERIA.names())}")
    parser.add_argument("--scope", choices=("local", "global"), default="local")
    parser.add_argument("--round-to", type=positive_int, default=None, help="kept filters per layer a multiple of N")
    parser.add_argument("--no-compact", action="store_true", help="keep pruned filters as zeros (compact later)")
    parser.add_argument("--seed", type=int, default=0, help="for the random criterion")
    parser.add_argument("--out", type=Path, required=True, help="directory for the pruned model")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.model_dir.resolve():
        raise UserError("--out: must differ from the input model directory")
    model, spec = load_artifact(args.model_dir)
    if spec.manifest is not None:
        raise UserError(f"model: {str(args.model_dir)!r} is already compacted; prune its dense checkpoint")
    if args.criterion in ("taylor", "movement", "bn_scale"):
        raise UserError(f"--criterion: {args.criterion} needs data or training; use the library API "
                        "(prunekit.core.sparsifier) or l1, l2, random here")
    example = torch.zeros(1, *spec.input_shape)
    macs_before, params_before = count_macs(model, spec.input_shape).total, count_params(model)
    if args.config:
        result = _prune_with_config(model, example, args)
        label = f"config={args.config} ({args.criterion})"
    else:
        result = prune_once(model, example, target=args.target, granularity=args.granularity,
                            criterion=args.criterion, scope=args.scope, round_to=args.round_to,
                            compact_model=not args.no_compact, seed=args.seed)
        label = args.target
    pruning = {"source": str(args.model_dir), "target": label, "granularity": args.granularity,
               "criterion": args.criterion, "scope": args.scope, "round_to": args.round_to}
    manifest = result.compaction.manifest if result.compaction else None
    if result.compaction is None:
        unit_masks = result.sparsifier.unit_masks()
        result.sparsifier.squash()
        with atomic_path(args.out / MASKS_NAME) as tmp:
            save_file({name: mask.to(torch.uint8).contiguous() for name, mask in unit_masks.items()}, str(tmp))
    macs_after, params_after = count_macs(model, spec.input_shape).total, count_params(model)
    sparsity = weight_sparsity(model, covers="conv")
    summary = {**pruning, "compacted": result.compaction is not None,
               "macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
               "params_after": params_after, "conv_weight_sparsity": sparsity.fraction,
               "sparsity_covers": sparsity.describe()}
    save_artifact(model, ModelSpec(**{**spec.__dict__, "metadata": {**spec.metadata, "pruning": pruning}}),
                  args.out, manifest=manifest)
    write_json(args.out / "prune.json", summary)
    console().print(key_value_table(f"pruned {spec.model} to {label}", [
        ("MACs", f"{macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.3f}x)"),
        ("params", f"{params_before:,} -> {params_after:,} ({params_after / params_before:.3f}x)"),
        ("sparsity", sparsity.describe()),
        ("compacted", "yes" if result.compaction else "no (zeros in place; masks in masks.safetensors)"),
        ("saved to", str(args.out)),
    ]))
    return 0


def _prune_with_config(model: torch.nn.Module, example: torch.Tensor, args: argparse.Namespace) -> OneShotResult:
    """Filters chosen by a FILTER_CONFIGS entry: removed (compacted) or masked with their coupled tensors."""
    from prunekit.core.compaction import compact
    from prunekit.experiment.stages import attach_masks
    from prunekit.methods.filter_configs import filter_keep, keep_masks

    for flag, value, default in (("--granularity", args.granularity, "filter"), ("--scope", args.scope, "local"),
                                 ("--round-to", args.round_to, None)):
        if value != default:
            raise UserError(f"{flag}: --config fixes the pruned filters and counts; drop {flag}")
    if args.criterion not in ("l1", "l2", "random"):
        raise UserError(f"--criterion: --config ranks filters by l1, l2 or random, got {args.criterion!r}")
    keep = filter_keep(model, args.config, args.criterion, seed=args.seed)
    if not args.no_compact:
        return OneShotResult(None, compact(model, keep, example))
    return OneShotResult(attach_masks(model, keep_masks(model, keep), example), None)
