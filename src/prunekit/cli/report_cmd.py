"""``prunekit report``: plots (PNG) and a Markdown page for a run or a group of runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.cli.common import console
from prunekit.experiment.report import find_subject, make_report


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report", help="plot a run or group: accuracy vs sparsity/MACs, training curves, LR + sparsity, layers",
        description="Write PNG plots and report.md for a run or group (directory or id).")
    parser.add_argument("target", metavar="RUN_OR_GROUP", help="run or group directory, or its id in the store")
    parser.add_argument("--store", type=Path, default=None,
                        help="results store (default: the one the run names, else runs/results.sqlite)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plots (default RUN_OR_GROUP/report)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    subject = find_subject(args.target, args.store, args.out)
    written = make_report(subject)
    out = console()
    out.print(f"report for {subject.label} ({len(subject.run_dirs)} run{'s' * (len(subject.run_dirs) > 1)}):")
    for path in written:
        out.print(f"  {path}")
    return 0
