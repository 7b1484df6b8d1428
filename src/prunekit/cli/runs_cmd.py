"""``prunekit runs``: list the runs in the results store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from prunekit.cli.common import console
from prunekit.errors import UserError
from prunekit.experiment.compare import DEFAULT_STORE
from prunekit.experiment.store import COLUMNS, ResultsStore, dumps, parse_filters, process_alive


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("runs", help="list runs in the results store",
                                 description="List the runs in the results store, oldest first.")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"results store (default {DEFAULT_STORE})")
    parser.add_argument("--filter", dest="filters", action="append", default=[], metavar="KEY=VALUE",
                        help=f"keep rows whose KEY equals VALUE (repeat: AND across keys, OR within a key); "
                             f"keys: {', '.join(COLUMNS)}")
    parser.add_argument("--json", action="store_true", help="print every column as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = ResultsStore(args.store)
    filters = parse_filters(args.filters)
    if not store.exists():
        raise UserError(f"--store: {str(args.store)!r} does not exist; run prunekit run first")
    rows = store.rows(filters)
    if args.json:
        print(dumps(rows))
        return 0
    out = console()
    table = Table(title=f"{len(rows)} run{'s' * (len(rows) != 1)} in {args.store}")
    for column in ("run", "status", "method", "model", "data", "target", "sparsity", "MACs", "final acc",
                   "best acc", "wall", "finished"):
        table.add_column(column, justify="right" if column in ("sparsity", "MACs", "final acc", "best acc", "wall")
                         else "left")
    for row in rows:
        table.add_row(row["run_id"], _status(row), row["method"] or "-", row["model"], row["data"],
                      row["target"] or "-", _pct(row["sparsity"]),
                      f"{row['macs']:,}" if row["macs"] is not None else "-", _pct(row["final_test_acc"]),
                      _pct(row["best_test_acc"]), f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] else "-",
                      (row["finished_at"] or "")[:19])
    out.print(table)
    for row in rows:
        if row["status"] == "failed":
            out.print(f"[red]{row['run_id']} failed:[/red] {row['error']}")
    return 0


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "running" and process_alive(row) is False:
        return "interrupted"
    return row["status"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
