"""``prunekit schedule``: print (or plot) a sparsity schedule over the training budget."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

from rich.table import Table

from prunekit.cli.common import PLOT_FORMATS, check_plot_path, console
from prunekit.cli.parsing import int_at_least, number, positive_int
from prunekit.core.schedules import SCHEDULES, Schedule, build_schedule
from prunekit.errors import UserError
from prunekit.io import atomic_path

log = logging.getLogger(__name__)

# shape parameter -> the CLI flag that sets it
SHAPE_FLAGS = {"alpha": "--alpha", "beta": "--beta", "n": "--steps"}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "schedule", help="print or plot a sparsity schedule over the training budget",
        description="Sparsity as a function of training progress p (fraction of the budget's iterations "
                    "done), with a pruning window [start, end].")
    parser.add_argument("name", help=f"schedule: {', '.join(SCHEDULES.names())}")
    parser.add_argument("--final", type=number, required=True, help="final sparsity, a fraction (0.9 = 90%%)")
    parser.add_argument("--initial", type=number, default=0.0, help="sparsity before the window (default 0)")
    parser.add_argument("--start", type=number, default=0.0, help="window start, fraction of the budget (default 0)")
    parser.add_argument("--end", type=number, default=1.0, help="window end, fraction of the budget (default 1)")
    parser.add_argument("--points", type=int_at_least(2), default=11, help="evenly spaced values of p to list (default 11)")
    parser.add_argument("--alpha", type=number, default=None, help="one_cycle slope (default 14)")
    parser.add_argument("--beta", type=number, default=None, help="one_cycle offset (default 5)")
    parser.add_argument("--steps", type=positive_int, default=None, help="iterative: number of pruning steps (default 3)")
    parser.add_argument("--json", action="store_true", help='print a JSON list of {"p": ..., "sparsity": ...}')
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help=f"also draw the curve to FILE ({', '.join('.' + f for f in PLOT_FORMATS)})")
    parser.set_defaults(run=run)


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    factory = SCHEDULES.get(args.name)
    accepted = inspect.signature(factory).parameters
    shape_args = {}
    for param, flag in SHAPE_FLAGS.items():
        value = getattr(args, flag.lstrip("-"))
        if value is None:
            continue
        if param not in accepted:
            takers = [n for n in SCHEDULES.names() if param in inspect.signature(SCHEDULES.get(n)).parameters]
            raise UserError(f"{flag}: only {', '.join(takers)} takes it, not {args.name}")
        shape_args[param] = value
    return build_schedule(args.name, args.final, initial=args.initial, start=args.start, end=args.end,
                          **shape_args)


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    if args.plot is not None:
        check_plot_path(args.plot)
    curve = schedule.curve(args.points)
    if args.json:
        print(json.dumps([{"p": p, "sparsity": s} for p, s in curve]))
    else:
        out = console()
        out.print(schedule.describe())
        table = Table()
        table.add_column("p", justify="right")
        table.add_column("sparsity", justify="right")
        table.add_column("%", justify="right")
        for p, s in curve:
            table.add_row(f"{p:.4g}", f"{s:.4f}", f"{100 * s:.2f}")
        out.print(table)
    if args.plot is not None:
        plot_schedule(schedule, args.plot, marks=curve)
        if args.json:
            log.info("wrote %s", args.plot)
        else:
            console().print(f"plot written to {args.plot}")
    return 0


def plot_schedule(schedule: Schedule, path: str | Path, *, marks: list[tuple[float, float]] | None = None,
                  samples: int = 2001) -> None:
    """Draw s(p) over the whole budget with the pruning window shaded; written atomically.

    Uses matplotlib's object API on an Agg canvas, so no global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    path = Path(path)
    fmt = check_plot_path(path)
    # Dense grid plus both sides of the window edges and of every step boundary we know of,
    # so jumps are drawn vertical rather than as slanted segments.
    ps = {i / (samples - 1) for i in range(samples)} | {schedule.start, schedule.end}
    eps = 1e-9
    ps |= {min(1.0, schedule.start + eps), max(0.0, schedule.end - eps)}
    n = schedule.params.get("n")
    if isinstance(n, int):
        width = schedule.end - schedule.start
        for k in range(1, n):
            edge = schedule.start + width * k / n
            ps |= {edge, min(1.0, edge + eps)}
    grid = sorted(ps)
    values = [schedule(p) for p in grid]

    fig = Figure(figsize=(7.0, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvspan(schedule.start, schedule.end, color="tab:blue", alpha=0.12, lw=0,
               label=f"pruning window [{schedule.start:g}, {schedule.end:g}]")
    ax.plot(grid, values, color="tab:blue", lw=2, label="target sparsity s(p)")
    if marks:
        ax.plot([p for p, _ in marks], [s for _, s in marks], "o", color="tab:orange", ms=4,
                label=f"{len(marks)} listed points")
    ax.axhline(schedule.final, color="grey", ls=":", lw=1, label=f"final sparsity {100 * schedule.final:.4g}%")
    ax.set_xlim(0, 1)
    top = max(schedule.final, 0.05)
    ax.set_ylim(-0.02 * top, 1.05 * top)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_xlabel("training progress p (share of the budget's iterations done)")
    ax.set_ylabel("sparsity")
    ax.set_title(schedule.describe(), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
