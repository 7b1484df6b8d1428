"""``prunekit runs``: list the runs in the results store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from prunekit.cli.common import console
from prunekit.cli.compare_cmd import si
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
    if args.store.is_dir():
        raise UserError(f"--store: {str(args.store)!r} is a directory; expected the store's file, "
                        f"e.g. {str(args.store / DEFAULT_STORE.name)!r}")
    rows = ResultsStore(args.store).rows(parse_filters(args.filters))  # no store yet: no runs
    if args.json:
        print(dumps(rows))
        return 0
    out = console()
    contexts = sorted({f"{r['model']} / {r['data']}" for r in rows})
    title = f"{len(rows)} run{'s' * (len(rows) != 1)} in {args.store}"
    if len(contexts) == 1:
        title += f" ({contexts[0]})"
    table = Table(title=title)
    table.add_column("run", overflow="fold", min_width=16)
    table.add_column("status", no_wrap=True)
    if len(contexts) > 1:
        table.add_column("model/data", overflow="fold")
    for column in ("method", "target", "sparsity", "MACs", "final acc", "wall"):
        table.add_column(column, justify="left" if column in ("method", "target") else "right",
                         no_wrap=column not in ("method", "target"), overflow="fold")
    for row in rows:
        cells = [row["run_id"], _status(row)]
        if len(contexts) > 1:
            cells.append(f"{row['model']}/{row['data']}")
        cells += [f"{row['method'] or '-'}" + (f"/{row['granularity']}" if row["granularity"] else ""),
                  row["target"] or "-", _pct(row["sparsity"]),
                  si(row["macs"]) if row["macs"] is not None else "-", _pct(row["final_test_acc"]),
                  f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] else "-"]
        table.add_row(*cells)
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
