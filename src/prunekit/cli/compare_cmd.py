"""``prunekit compare``: one table over runs (mean ± std over seeds), printed and written as Markdown + CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from prunekit.cli.common import console
from prunekit.errors import UserError
from prunekit.experiment.compare import HEADERS, cells, compare, find_store, select, selected_rows, write_tables
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
    table = Table(title=f"{len(rows)} runs, {len(comparison.rows)} recipes (mean ± std over runs of one recipe)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in HEADERS[:5] else "right")
    for row in comparison.rows:
        table.add_row(*cells(row))
    out.print(table)
    if comparison.skipped:
        out.print("not compared (not done): " + ", ".join(f"{k} ({v})" for k, v in comparison.skipped.items()))
    out.print(f"written: {markdown}, {csv_path}")
    return 0
