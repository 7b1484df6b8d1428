"""``prunekit run``: run a recipe (every seed), or continue an interrupted run with ``--resume``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from prunekit.cli.common import add_launch_arguments, console, launch_line, launch_options
from prunekit.cli.parsing import positive_int
from prunekit.cli.progress import ProgressHook
from prunekit.errors import UserError
from prunekit.experiment.recipe import RecipeError, load_recipe
from prunekit.experiment.runner import STORE_NAME, resume, run_recipe


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run", help="run an experiment recipe (train, prune, retrain, compact, evaluate, export)",
        description="Validate a recipe, then run its stages for every seed; each run gets a directory "
                    "and a row in the results store. See docs/recipes.md for the keys.")
    parser.add_argument("recipe", nargs="?", type=Path, help="recipe YAML (or a run's recipe.yaml to reproduce it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.epochs=5 (repeatable; YAML values)")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                        help="run seeds 0..N-1 (overrides the recipe's seeds)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where groups of runs go (default runs/)")
    parser.add_argument("--store", type=Path, default=None,
                        help=f"results store (default OUT/{STORE_NAME})")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run (or every run of a group directory)")
    add_launch_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = console()
    hooks_for = lambda stage: [ProgressHook(out)]  # noqa: E731
    events = _Printer(out)
    if args.resume is not None:
        if args.recipe is not None or args.overrides or args.seeds is not None:
            raise UserError("--resume: continues a run with its own recipe.yaml; give no RECIPE, --set or --seeds")
        try:
            rows = resume(args.resume, hooks_for=hooks_for, events=events, launch=launch_options(args))
        except RecipeError as exc:
            return _problems(args, exc)
    else:
        if args.recipe is None:
            raise UserError("recipe: give a recipe file, or --resume RUN_DIR")
        try:
            recipe = load_recipe(args.recipe, args.overrides, seeds=args.seeds)
        except RecipeError as exc:
            return _problems(args, exc)
        out.print(f"recipe {recipe.name} ({len(recipe.seeds)} seed{'s' * (len(recipe.seeds) > 1)}, "
                  f"digest {recipe.digest()[:8]}) -> {args.out}")
        if (line := launch_line(recipe.data.batch_size, launch_options(args))) is not None:
            out.print(line)
        rows = run_recipe(recipe, args.out, store=args.store, hooks_for=hooks_for, events=events,
                          source=str(args.recipe), launch=launch_options(args))
    out.print(_table(rows))
    return 0


def _problems(args: argparse.Namespace, exc: RecipeError) -> int:
    for problem in exc.problems:
        sys.stderr.write(f"prunekit {args.command}: error: {problem}\n")
    return 2


class _Printer:
    """Renders runner events: one line per stage started, skipped or finished."""

    def __init__(self, out) -> None:
        self.out = out

    def __call__(self, stage: str, event: str, info: dict[str, Any]) -> None:
        if stage == "run":
            if event == "start":
                self.out.print(f"[bold]run {info['run_id']}[/bold] -> {info['run_dir']}")
            return
        if event == "start":
            self.out.print(f"  {stage} ...")
        elif event == "skip":
            self.out.print(f"  {stage}: already done, skipped")
        elif event == "done":
            self.out.print(f"  {stage}: done in {info.get('wall_time_s') or 0:.1f} s{_brief(stage, info)}")


def _brief(stage: str, info: dict[str, Any]) -> str:
    parts = []
    if info.get("final_test_acc") is not None:
        parts.append(f"test acc {info['final_test_acc']:.4f}")
    if info.get("dense_test_acc") is not None:
        parts.append(f"dense model {info['dense_test_acc']:.4f} at evaluation precision")
    if stage == "prune" and info.get("realised_sparsity") is not None:
        parts.append(f"{info['target']} -> {info['realised_sparsity']:.4f} of the {info['realised_covers']}")
        if info.get("test_acc_after_prune") is not None:
            parts.append(f"test acc right after pruning {info['test_acc_after_prune']:.4f}")
    if stage == "evaluate":
        parts.append(f"test acc {info['test_acc']:.4f}, {info['macs']:,} MACs, {info['params']:,} params, "
                     f"sparsity {info['sparsity']:.4f}")
    if stage == "export":
        parts.append(f"{info['onnx']} ({info['bytes']:,} bytes)")
    return f" ({'; '.join(parts)})" if parts else ""


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="results (final = last epoch on the test split; best = optimistic)")
    for column in ("run", "final acc", "best acc", "sparsity", "MACs", "params", "wall"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        macs = f"{row['macs']:,} ({row['macs'] / row['dense_macs']:.2f}x)" if row.get("macs") else "-"
        params = f"{row['params']:,} ({row['params'] / row['dense_params']:.2f}x)" if row.get("params") else "-"
        table.add_row(row["run_id"], _pct(row.get("final_test_acc")), _pct(row.get("best_test_acc")),
                      _pct(row.get("sparsity")), macs, params, f"{row.get('wall_time_s') or 0:.0f} s")
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
