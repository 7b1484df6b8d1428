"""``prunekit lr-plan``: print (or plot) a retraining LR plan (METHODS §2.4) epoch by epoch."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path

from rich.table import Table

from prunekit.cli.common import PLOT_FORMATS, check_plot_path, console
from prunekit.cli.parsing import positive_float, positive_int
from prunekit.errors import UserError
from prunekit.io import atomic_path
from prunekit.train.lr_plans import (LR_PLANS, PRESETS, RETRAINING_PLANS, LRRewind, RetrainingPlan, build_lr_plan,
                                     epoch_table)

log = logging.getLogger(__name__)

DEFAULT_STEPS_PER_EPOCH = {"cifar": 782, "imagenet": 5005}
"""NPTM's batches per epoch: CIFAR 50,000 images / 64, ImageNet 1,281,167 / 256 (last batch kept)."""
ALL = "all"
ORIGINALS = ("step", "cosine", "onecycle")
# colour, line style, width: plans that coincide (FT and LRW at small budgets, LRW and WR always)
# stay visible because the ones drawn first are wider.
STYLE = {"finetune": ("silver", "-", 6.0), "lr_rewind": ("tab:blue", "-", 3.2),
         "weight_rewind": ("tab:cyan", (0, (3, 2)), 1.6), "scaled_restart": ("tab:green", "-", 2.0),
         "cyclic_restart": ("tab:red", "-", 2.0)}
MAX_POINTS = 20_000


def _milestones(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs >= 1 such as 80,120, got {text!r}")
    return values


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "lr-plan", help="print or plot a retraining LR plan (fine-tuning, rewinding, restarts)",
        description="LR (and momentum) of a retraining phase of --budget t epochs after an original training "
                    "of --original-epochs T epochs (METHODS §2.4). Epochs are the retraining epochs e = 0 … t-1; "
                    "the values are those of each epoch's first step.")
    parser.add_argument("name", help=f"plan: {', '.join(RETRAINING_PLANS)}, or {ALL} (every plan)")
    parser.add_argument("--original-epochs", type=positive_int, default=None, metavar="T",
                        help="length of the original training (needed by lr_rewind and weight_rewind)")
    parser.add_argument("--budget", type=positive_int, required=True, metavar="t", help="retraining epochs")
    parser.add_argument("--steps-per-epoch", type=positive_int, default=None, metavar="N",
                        help="optimizer steps per epoch (default: cifar 782, imagenet 5005)")
    parser.add_argument("--preset", choices=PRESETS, default="cifar",
                        help="original step schedule (cifar: ÷10 at T/2 and 3T/4; imagenet: at T/3 and 2T/3) and "
                             "scaled_restart milestones (default cifar)")
    parser.add_argument("--original", choices=ORIGINALS, default="step",
                        help="schedule of the original training, replayed by the rewinding plans (default step)")
    parser.add_argument("--milestones", type=_milestones, default=None, metavar="E1,E2",
                        help="epochs of the original step schedule's drops (default from --preset)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="finetune: its constant LR (0.001); rewinding: the original's base LR; "
                             "scaled_restart and cyclic_restart: the peak (0.1)")
    parser.add_argument("--json", action="store_true",
                        help='print a JSON list of {"epoch": …, "lr": …} (with "momentum" where the plan cycles it); '
                             f"with {ALL}, an object of such lists by plan")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help="also draw LR (and momentum) against epoch to FILE "
                             f"({', '.join('.' + f for f in PLOT_FORMATS)})")
    parser.set_defaults(run=run)


def plans_from_args(args: argparse.Namespace) -> dict[str, RetrainingPlan]:
    names = list(RETRAINING_PLANS) if args.name == ALL else [args.name]
    if args.name != ALL and args.name not in RETRAINING_PLANS:
        raise UserError(f"name: unknown retraining plan {args.name!r}; known: {', '.join(RETRAINING_PLANS)}, {ALL}")
    needs_original = [n for n in names if _replays_original(n)]
    if needs_original and args.original_epochs is None:
        raise UserError(f"--original-epochs: {needs_original[0]} replays the original schedule and needs its length T")
    if args.original != "step" and args.milestones is not None:
        raise UserError(f"--milestones: only a step original has milestones, not {args.original}")
    steps = args.steps_per_epoch or DEFAULT_STEPS_PER_EPOCH[args.preset]
    rewinding = {"original_milestones": args.milestones} if args.milestones is not None else {}
    rewinding["per_iteration"] = args.original != "step"  # replay a continuous original step by step
    plans = {}
    for name in names:
        # build_lr_plan hands original_epochs, preset and original only to the plans that take them
        plans[name] = build_lr_plan(name, lr=args.lr, epochs=args.budget, steps_per_epoch=steps,
                                    original_epochs=args.original_epochs, preset=args.preset, original=args.original,
                                    **(rewinding if _replays_original(name) else {}))
    return plans


def _replays_original(name: str) -> bool:
    """True for plans that replay the original run's schedule (they take its milestones)."""
    return "original_milestones" in inspect.signature(LR_PLANS.get(name)).parameters


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_plot_path(args.plot)
    plans = plans_from_args(args)
    steps = next(iter(plans.values())).steps_per_epoch
    tables = {name: epoch_table(plan, steps) for name, plan in plans.items()}
    if args.json:
        print(json.dumps(tables if args.name == ALL else tables[args.name]))
    else:
        out = console()
        for plan in plans.values():
            out.print(plan.describe())
        out.print(_table(tables, args))
    if args.plot is not None:
        plot_lr_plans(plans, args.plot, title=_title(args, steps))
        if args.json:
            log.info("wrote %s", args.plot)
        else:
            console().print(f"plot written to {args.plot}")
    return 0


def _title(args: argparse.Namespace, steps: int) -> str:
    original = f" after T={args.original_epochs}" if args.original_epochs else ""
    return f"retraining LR plans: t={args.budget} epochs{original} ({args.preset}, {steps} steps/epoch)"


def _table(tables: dict[str, list[dict]], args: argparse.Namespace) -> Table:
    original = f" after T={args.original_epochs}" if args.original_epochs else ""
    table = Table(title=f"t={args.budget} retraining epochs{original}")
    table.add_column("epoch", justify="right")
    for name, rows in tables.items():
        table.add_column(f"{name} lr" if len(tables) > 1 else "lr", justify="right")
        if "momentum" in rows[0]:
            table.add_column(f"{name} momentum" if len(tables) > 1 else "momentum", justify="right")
    for epoch in range(args.budget):
        cells = [str(epoch)]
        for rows in tables.values():
            row = rows[epoch]
            cells.append(f"{row['lr']:.4g}")
            if "momentum" in row:
                cells.append(f"{row['momentum']:.4g}")
        table.add_row(*cells)
    return table


def _sample_steps(plan: RetrainingPlan) -> list[int]:
    """Every step when affordable; otherwise an even grid plus both sides of each epoch boundary."""
    total, n = plan.total_steps, plan.steps_per_epoch
    if total <= MAX_POINTS:
        return list(range(total))
    stride = max(1, total // (MAX_POINTS // 2))
    steps = set(range(0, total, stride)) | {total - 1}
    for epoch in range(plan.epochs):
        steps |= {epoch * n, max(0, epoch * n - 1)}
    return sorted(steps)


def plot_lr_plans(plans: dict[str, RetrainingPlan], path: str | Path, *, title: str = "") -> None:
    """LR (log scale) against retraining epoch for each plan, momentum below where a plan sets it;
    written atomically through matplotlib's object API on an Agg canvas (no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = check_plot_path(path)
    curves = {}
    for name, plan in plans.items():
        steps = _sample_steps(plan)
        # Per-epoch plans hold their value over the epoch: draw a step curve to its end.
        xs = [s / plan.steps_per_epoch for s in steps] + [plan.epochs]
        lrs = [plan.lr(s) for s in steps]
        moms = [plan.momentum(s) for s in steps]
        curves[name] = (xs, lrs + lrs[-1:], moms + moms[-1:] if moms[0] is not None else None)
    with_momentum = any(m is not None for _, _, m in curves.values())
    fig = Figure(figsize=(8.0, 6.2 if with_momentum else 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    if with_momentum:
        ax, ax_m = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    else:
        ax, ax_m = fig.add_subplot(), None
    same_as_lrw = "lr_rewind" in plans and "weight_rewind" in plans
    for name, (xs, lrs, moms) in curves.items():
        color, style, width = STYLE.get(name, ("black", "-", 2.0))
        label = name
        plan = plans[name]
        if isinstance(plan, LRRewind):
            label += f" (from original epoch {plan.rewind_epoch})"
        if name == "weight_rewind" and same_as_lrw:
            label = "weight_rewind (same LR as lr_rewind)"
        ax.plot(xs, lrs, color=color, ls=style, lw=width, drawstyle="steps-post", label=label)
        if ax_m is not None and moms is not None:
            ax_m.plot(xs, moms, color=color, ls=style, lw=min(width, 2.0), drawstyle="steps-post",
                      label=f"{name} momentum")
    ax.set_yscale("log")
    ax.set_ylabel("learning rate (log scale)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    epochs = max(p.epochs for p in plans.values())
    ax.set_xlim(0, epochs)
    bottom = ax_m if ax_m is not None else ax
    if ax_m is not None:
        ax_m.set_ylabel("momentum")
        ax_m.grid(True, alpha=0.35)
        ax_m.legend(loc="lower right", fontsize=8, framealpha=0.9)
        lo = min(min(m) for _, _, m in curves.values() if m is not None)
        hi = max(max(m) for _, _, m in curves.values() if m is not None)
        pad = max(0.01, 0.15 * (hi - lo))
        ax_m.set_ylim(lo - pad, hi + pad)
    bottom.set_xlabel("retraining epoch")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
