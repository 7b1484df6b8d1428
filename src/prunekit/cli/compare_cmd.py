"""``prunekit compare``: one table over runs (mean ± std over seeds), printed and written as Markdown + CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from prunekit.cli.common import console
from prunekit.errors import UserError
from prunekit.experiment.compare import Comparison, Stat, compare, find_store, select, selected_rows, write_tables
from prunekit.experiment.store import parse_filters


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", help="compare runs: one row per recipe, mean ± std over seeds; writes Markdown and CSV",
        description="Compare runs named by id or directory (RUN...), or every run matching --where filters.")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run or group: id (GROUP/s0, GROUP) or directory")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="select runs by store column, e.g. --where model=resnet20 (repeatable)")
    parser.add_argument("--store", type=Path, default=None,
                        help="results store (default: the one the run directories name, else runs/results.sqlite)")
    parser.add_argument("--md", type=Path, default=None, help="Markdown file (default STORE_DIR/compare.md)")
    parser.add_argument("--csv", type=Path, default=None, help="CSV file (default STORE_DIR/compare.csv)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.runs and not args.where:
        raise UserError("compare: name runs (RUN ...) or select them with --where KEY=VALUE")
    filters = parse_filters(args.where, "--where")
    store = find_store(args.runs, args.store)
    rows = selected_rows(select(store, args.runs)) if args.runs else []
    if filters:
        matching = store.rows(filters)
        if args.runs:
            keep = {r["run_id"] for r in matching}
            rows = [r for r in rows if r["run_id"] in keep]
        else:
            rows = matching
    if not rows:
        raise UserError("compare: no run matches the selection")
    comparison = compare(rows)
    markdown = args.md or store.path.parent / "compare.md"
    csv_path = args.csv or store.path.parent / "compare.csv"
    write_tables(comparison, markdown, csv_path)
    out = console()
    out.print(_table(comparison, len(rows)))
    if comparison.skipped:
        out.print("not compared (not done): " + ", ".join(f"{k} ({v})" for k, v in comparison.skipped.items()))
    out.print(f"written: {markdown}, {csv_path}")
    return 0


def _table(comparison: Comparison, runs: int) -> Table:
    """The console view (params and the rest are in the Markdown/CSV files); identity columns shared by
    every row go into the title."""
    contexts = sorted({f"{r.model} / {r.data}" for r in comparison.rows})
    title = f"{runs} runs, {len(comparison.rows)} recipes (mean ± std over runs of one recipe)"
    if len(contexts) == 1:
        title += f": {contexts[0]}"
    table = Table(title=title)
    table.add_column("recipe" if len(contexts) == 1 else "recipe, model/data", overflow="fold", min_width=16)
    for column in ("method", "target", "runs", "final acc %", "best %", "sparsity %", "MACs"):
        table.add_column(column, justify="left" if column in ("method", "target") else "right",
                         no_wrap=column not in ("method", "target"), overflow="fold")
    for row in comparison.rows:
        cells = [f"{row.name} ({row.recipe_hash[:8]})" + (f"\n{row.model}/{row.data}" if len(contexts) > 1 else "")]
        s = row.stats
        cells += [f"{row.method}" + (f"/{row.granularity}" if row.granularity else ""), row.target or "-",
                  str(len(row.runs)), _pm(s["final_test_acc"]), _mean(s["best_test_acc"]), _mean(s["sparsity"]),
                  _ratio(s["macs"], row.dense_macs)]
        table.add_row(*cells)
    return table


def _pm(stat: Stat) -> str:
    if stat.mean is None:
        return "-"
    return f"{100 * stat.mean:.2f}" + (f" ± {100 * stat.std:.2f}" if stat.std is not None else "")


def _mean(stat: Stat) -> str:
    return "-" if stat.mean is None else f"{100 * stat.mean:.2f}"


def _ratio(stat: Stat, dense: float | None) -> str:
    if stat.mean is None:
        return "-"
    return f"{si(stat.mean)} ({stat.mean / dense:.2f}x)" if dense else si(stat.mean)


def si(count: float) -> str:
    """3,400,000 -> 3.40M; 56,554 -> 56.6K."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"
