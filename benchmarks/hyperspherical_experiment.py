"""Pruning On-the-Fly at small scale (METHODS §1.6): does a hyperspherical model trained with the
pruned-energy penalty lose almost nothing when pruned with no retraining?

    python benchmarks/hyperspherical_experiment.py --data-dir ../shared/data [--epochs 15]
        [--seeds 0 1] [--replicated A C] [--arms A B C D] [--ratios 0.3 0.5 0.7 0.8]
        [--finetune-epochs 3] [--lam 1.0] [--bn-batches 4] [--overhead-steps 20] [--parallel 2]
        [--subset N] [--summary-only]

Arms (recipes/hyperspherical/, the single definition of each): (A) standard convs, (B)
hyperspherical convs, (C) hyperspherical + penalty at s = 0.5, (D) the same at s = 0.7; CIFAR-10
ResNet-20 trained from scratch with the same budget, optimizer and LR plan. Every arm runs on the
first seed, the ``--replicated`` arms (default A and C) on every seed. For each (arm, seed), as its
own process (``--parallel`` at a time), each step resumable and skipped once done:

1. the arm's recipe run (dense training, then the prune stage at the recipe's ratio) under
   runs/hyperspherical/<tag>/seed<S>/;
2. on the fly (kept inside that run, under onthefly/): the trained model pruned by the prune stage (:func:`prunekit.methods.run_prune`,
   what ``prunekit prune`` runs) at every ``--ratios`` value with no retraining, without and with
   each recovery mode, and BN-recalibrated on ``--bn-batches`` training batches as a labelled
   extra; the standard arm is pruned by the magnitude of its raw weights; then the same four
   ratios as one ``prunekit prune RUN --sweep ratio=... --plot`` command in its own process, timed
   whole, its accuracies checked against the stage's (first seed only; the command always tests on
   the full test set, so with ``--subset`` they differ);
3. A, C and D: the fine-tune recipe (finetune_<arm>.yaml: pruned at 0.7, masks fixed, one
   identical short fine-tune) started from the arm's trained model;
4. each prunable layer's pruned energy R_l at s = 0.5 and 0.7 at the end of training and the
   histogram of log10 |ŵ| (filters normalised; for A its raw filters normalised).

Then the training overhead of the penalty is measured in this process
(benchmarks/hyperspherical_overhead.py). Only (arm, seed) pairs whose every step finished are
written (one JSON each), and the summary is written only when every requested pair is there. A
pair with its JSON is never run again: committed pair files carry the experiment over to a later
session or machine whose runs/ folder is gone (a pair in progress there starts again).
Writes benchmarks/results/hyperspherical/<tag>/: summary.json, table.md, accuracy-vs-ratio.png,
histograms.png, energy.png, overhead.json. ``<tag>`` is ``e<epochs>`` (``-subset<N>`` for smoke
runs, ``-lam<λ>`` when ``--lam`` overrides the recipes' λ).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from machine import machine_info, precision_line
from processes import run_processes
from recipe_runs import run_or_resume
from prunekit.artifact import load_artifact
from prunekit.core.energy import filter_energies, low_magnitude_mask, pruned_count
from prunekit.core.hyperspherical import unit_rows
from prunekit.core.onthefly import prunable_layers
from prunekit.experiment.recipe import Recipe, apply_overrides, load_recipe, parse_yaml, validate_prune, validate_recipe
from prunekit.experiment.runner import RESULT_FILE
from prunekit.experiment.stages import StageContext
from prunekit.io import atomic_path, write_json
from prunekit.methods import run_prune

RECIPES = Path("recipes/hyperspherical")
RUNS = Path("runs/hyperspherical")
SOURCE = "benchmarks/hyperspherical_experiment.py"
RESULTS = Path("benchmarks/results/hyperspherical")
ARMS = {"A": "standard", "B": "hs", "C": "hs_penalty_s0.5", "D": "hs_penalty_s0.7"}
LABELS = {"A": "A standard", "B": "B hyperspherical", "C": "C HS + penalty s=0.5", "D": "D HS + penalty s=0.7"}
COLOURS = {"A": "C0", "B": "C1", "C": "C3", "D": "C2"}
FINETUNED = ("A", "C", "D")
FINETUNE_RATIO = 0.7
RECOVERIES = ("none", "layer_mean", "filter_mean", "signed_abs_mean")
ENERGY_SPARSITIES = (0.5, 0.7)
BINS = np.linspace(-7.0, 0.0, 71)  # log10 |ŵ|; smaller magnitudes land in the first bin


# ------------------------------------------------------------------------ recipes and runs
def tag(args: argparse.Namespace) -> str:
    out = f"e{args.epochs}"
    out += f"-subset{args.subset}" if args.subset else ""
    return out + (f"-lam{args.lam:g}" if args.lam is not None else "")


def overrides(arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    out = [f"seeds=[{seed}]", f"train.epochs={args.epochs}"]
    out += [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    out += [f"data.subset={args.subset}"] if args.subset else []
    return out + ([f"prune.lam={args.lam}"] if args.lam is not None and arm in ("C", "D") else [])


def arm_recipe(arm: str, seed: int, args: argparse.Namespace, extra: list[str] = ()) -> Recipe:
    return load_recipe(RECIPES / f"{ARMS[arm]}.yaml", [*overrides(arm, seed, args), *extra])


def finetune_recipe(arm: str, seed: int, args: argparse.Namespace, checkpoint: Path) -> Recipe:
    """finetune_<arm>.yaml started from ``checkpoint`` (the arm's trained model) instead of training again."""
    path = RECIPES / f"finetune_{ARMS[arm]}.yaml"
    raw = parse_yaml(path.read_text(), str(path))
    problems = apply_overrides(raw, [*overrides(arm, seed, args), f"retrain.epochs={args.finetune_epochs}"])
    if problems:
        raise SystemExit(f"{path}: {problems}")
    raw["train"] = {"checkpoint": str(checkpoint)}
    return validate_recipe(raw, str(path))


def stage(run_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((run_dir / name / "stage.json").read_text())


# ------------------------------------------------------------------------ one (arm, seed)
def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    out = RUNS / tag(args)
    recipe = arm_recipe(arm, seed, args)
    run_dir = Path(run_or_resume(recipe, out, source=SOURCE)["run_dir"])
    train = stage(run_dir, "train")
    history = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    row: dict[str, Any] = {"arm": arm, "recipe": ARMS[arm], "seed": seed, "run_dir": str(run_dir),
                           "dense_test_acc": train["dense_test_acc"], "train_wall_time_s": train["wall_time_s"],
                           "precision": train["precision"], "machine": machine_info(),
                           "recipe_prune": stage(run_dir, "prune"), "curve": [m["test_acc"] for m in history],
                           "logged_energy": {k: v for k, v in history[-1]["extra"].items() if "energy" in k}}
    # kept inside the run they evaluate, so a cached result can never be another run's
    row["onthefly"] = on_the_fly(recipe, run_dir, run_dir / "onthefly", args)
    if seed == args.seeds[0]:  # a speed figure and a consistency check: once per arm
        row["one_command"] = one_command(arm, run_dir, run_dir / "onthefly-command", args)
    if arm in FINETUNED:
        tuned = Path(run_or_resume(finetune_recipe(arm, seed, args, run_dir / "train"), out / "finetune",
                                    source=SOURCE)["run_dir"])
        row["finetune"] = {"ratio": FINETUNE_RATIO, "epochs": args.finetune_epochs,
                           "after_prune": stage(tuned, "prune")["test_acc_after_prune"],
                           "after_finetune": json.loads((tuned / RESULT_FILE).read_text())["final_test_acc"],
                           "run_dir": str(tuned)}
    model, _ = load_artifact(run_dir / "train")
    row["energy"] = {f"{s:g}": layer_energies(model, s) for s in ENERGY_SPARSITIES}
    row["histogram"] = magnitude_histogram(model)
    return row


def on_the_fly(recipe: Recipe, run_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The trained model pruned at every ratio, with each recovery mode; each result kept on disk."""
    context = StageContext(recipe, run_dir).method_context("prune")
    base = recipe.prune.model_dump()
    results: dict[str, Any] = {}
    for ratio in args.ratios:
        for recovery in RECOVERIES:
            folder = out / f"r{ratio:g}-{recovery}"
            if not (folder / "prune.json").is_file():
                model, spec = load_artifact(run_dir / "train")
                method = validate_prune({**base, "ratio": ratio, "recovery": recovery,
                                         "bn_recalibration": args.bn_batches if recovery == "none" else 0})
                began = time.perf_counter()
                summary = run_prune(method, model, spec, context, folder, compact=False)
                write_json(folder / "prune.json", {**summary, "stage_wall_time_s": time.perf_counter() - began})
            results[f"{ratio:g}/{recovery}"] = json.loads((folder / "prune.json").read_text())
    return results


def one_command(arm: str, run_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``prunekit prune RUN --method ... --sweep ratio=... --plot`` as a user runs it (its own process,
    the environment's threads; the method's keys as flags from the arm's recipe): wall time, and its
    accuracies, which must equal the library path's."""
    timing = out / "command.json"
    if not timing.is_file():
        shutil.rmtree(out / "sweep", ignore_errors=True)  # a killed command is run again whole
        path = RECIPES / f"{ARMS[arm]}.yaml"
        keys = {k: v for k, v in parse_yaml(path.read_text(), str(path))["prune"].items() if k != "ratio"}
        flags = [text for key, value in keys.items() for text in (f"--{key.replace('_', '-')}", str(value))]
        command = [sys.executable, "-m", "prunekit", "prune", str(run_dir / "train"), *flags, "--sweep",
                   "ratio=" + ",".join(f"{r:g}" for r in args.ratios), "--plot", str(out / "sweep" / "curve.png"),
                   "--out", str(out / "sweep")] + (["--data-dir", args.data_dir] if args.data_dir else [])
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        write_json(timing, {"wall_s": time.perf_counter() - began, "threads": os.environ.get("OMP_NUM_THREADS"),
                            "command": ["prunekit", *command[3:]]})
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    return {**json.loads(timing.read_text()),
            "test_acc": {row["ratio"]: row["test_acc_after_prune"] for row in sweep["rows"]}}


def layer_energies(model: torch.nn.Module, sparsity: float) -> dict[str, float]:
    """R_l = mean_f E_{l,f} of every prunable layer at ``sparsity``, its filters normalised (§1.3.3)."""
    out = {}
    with torch.no_grad():
        for name, layer in prunable_layers(model).items():
            unit = unit_rows(layer.weight.detach())
            pruned = low_magnitude_mask(unit, pruned_count(unit.numel(), sparsity))
            out[name] = float(filter_energies(unit, pruned).mean())
    return out


def magnitude_histogram(model: torch.nn.Module) -> list[int]:
    """Counts of log10 |ŵ| over the prunable convs (``BINS``; smaller values in the first bin)."""
    values = torch.cat([unit_rows(layer.weight.detach()).abs().flatten()
                        for layer in prunable_layers(model, prune_classifier=False).values()])
    logs = np.clip(np.log10(values.clamp_min(1e-30).numpy()), BINS[0], BINS[-1])
    return np.histogram(logs, BINS)[0].tolist()


# ------------------------------------------------------------------------------ launching
def jobs(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [(arm, seed) for arm in args.arms for seed in args.seeds
            if seed == args.seeds[0] or arm in args.replicated]


def arm_file(arm: str, seed: int, args: argparse.Namespace) -> Path:
    return RESULTS / tag(args) / f"{arm}-seed{seed}.json"


def launch_all(args: argparse.Namespace) -> None:
    """Every (arm, seed) not written yet as its own process, ``--parallel`` at a time."""
    run_processes([[sys.executable, __file__, "--one", arm, str(seed), *forwarded(args)]
                   for arm, seed in jobs(args) if not arm_file(arm, seed, args).is_file()], args.parallel)


def forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs),
           "--bn-batches", str(args.bn_batches), "--ratios", *map(str, args.ratios)]
    out += ["--subset", str(args.subset)] if args.subset else []
    out += ["--lam", str(args.lam)] if args.lam is not None else []
    return out + (["--data-dir", args.data_dir] if args.data_dir else [])


# -------------------------------------------------------------------------------- summary
def mean(values: list[float]) -> float:
    return statistics.mean(values)


def spread(values: list[float]) -> str:
    return f"{100 * mean(values):.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def summarise(rows: list[dict], args: argparse.Namespace, overhead: dict | None) -> None:
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    ratios = [f"{r:g}" for r in args.ratios]
    arms: dict[str, Any] = {}
    for arm, group in by_arm.items():
        acc = {key: [r["onthefly"][key]["test_acc_after_prune"] for r in group] for key in group[0]["onthefly"]}
        recal = {ratio: [r["onthefly"][f"{ratio}/none"]["test_acc_bn_recalibrated_extra"] for r in group]
                 for ratio in ratios} if args.bn_batches else {}
        arms[arm] = {"seeds": [r["seed"] for r in group], "dense": [r["dense_test_acc"] for r in group],
                     "after_prune": acc, "bn_recalibrated_extra": recal,
                     "finetune": [r["finetune"] for r in group if "finetune" in r],
                     "energy": {s: {layer: mean([r["energy"][s][layer] for r in group]) for layer in group[0]["energy"][s]}
                                for s in group[0]["energy"]},
                     "prune_time_s_four_ratios": [sum(r["onthefly"][f"{ratio}/none"]["prune_time_s"] for ratio in ratios)
                                                  for r in group],
                     "prune_stage_wall_s_four_ratios": [sum(r["onthefly"][f"{ratio}/none"]["stage_wall_time_s"]
                                                            for ratio in ratios) for r in group],
                     "one_command_wall_s": [r["one_command"]["wall_s"] for r in group if "one_command" in r],
                     "one_command_vs_library_max_diff": max(
                         abs(r["one_command"]["test_acc"][ratio] - r["onthefly"][f"{ratio}/none"]["test_acc_after_prune"])
                         for r in group if "one_command" in r for ratio in ratios)}
    lines = table(arms, ratios, args) + ["", precision_line(rows, arm=lambda row: row["arm"])]
    if overhead:
        lines += ["", f"Penalty overhead per training step (one run, {overhead['setup']}): "
                      f"{overhead['penalty_vs_hyperspherical']:.3f}x the plain hyperspherical step, "
                      f"{overhead['penalty_vs_standard']:.3f}x the standard step (goal ≤ {overhead['goal']}x)."]
    folder = RESULTS / tag(args)
    write_json(folder / "summary.json", {"epochs": args.epochs, "subset": args.subset, "ratios": args.ratios,
                                         "finetune_epochs": args.finetune_epochs, "bn_batches": args.bn_batches,
                                         "arms": arms, "overhead": overhead, "runs": rows, "machine": machine_info()})
    with atomic_path(folder / "table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot_accuracy(arms, args)
    plot_histograms(rows, args)
    plot_energy(arms, args)
    print("\n".join(lines))


def table(arms: dict[str, Any], ratios: list[str], args: argparse.Namespace) -> list[str]:
    scale = f"{args.epochs} epochs" + (f", first {args.subset} training images" if args.subset else "")
    head = " | ".join(f"s′={r}" for r in ratios)
    lines = [f"Test accuracy (%) of CIFAR-10 ResNet-20 ({scale}), mean ± std over seeds; pruned with no retraining "
             "(first conv dense, classifier pruned, layer-wise exact top-k).", "",
             f"| arm | seeds | dense | recovery | {head} |", "|---|---|---|---|" + "---|" * len(ratios)]
    for arm in sorted(arms):
        a = arms[arm]
        for recovery in RECOVERIES:
            cells = " | ".join(spread(a["after_prune"][f"{r}/{recovery}"]) for r in ratios)
            first = (f"{LABELS[arm]} | {len(a['seeds'])} | {spread(a['dense'])}" if recovery == "none" else " | | ")
            label = "none (zeros)" if recovery == "none" else f"{recovery} (mask + constant)"
            lines.append(f"| {first} | {label} | {cells} |")
        if a["bn_recalibrated_extra"]:
            cells = " | ".join(spread(a["bn_recalibrated_extra"][r]) for r in ratios)
            lines.append(f"|  |  |  | extra: BN recalibrated ({args.bn_batches} batches), zeros | {cells} |")
    lines += ["", f"Short identical fine-tune at s′ = {FINETUNE_RATIO} ({args.finetune_epochs} epochs, masks fixed):",
              "", "| arm | seeds | right after pruning | after fine-tune |", "|---|---|---|---|"]
    for arm in sorted(a for a in arms if arms[a]["finetune"]):
        tuned = arms[arm]["finetune"]
        lines.append(f"| {LABELS[arm]} | {len(tuned)} | {spread([t['after_prune'] for t in tuned])} | "
                     f"{spread([t['after_finetune'] for t in tuned])} |")
    lines += ["", "| arm | mean pruned energy R_l at s=0.5 | at s=0.7 | pruning at the four ratios (prune only / "
                  "stage with MACs, save, test) | `prunekit prune --sweep` at the four ratios, whole command | "
                  "its accuracies vs the stage's (max diff) |", "|---|---|---|---|---|---|"]
    for arm in sorted(arms):
        a = arms[arm]
        energy = {s: mean(list(v.values())) for s, v in a["energy"].items()}
        lines.append(f"| {LABELS[arm]} | {energy.get('0.5', float('nan')):.2e} | {energy.get('0.7', float('nan')):.2e} | "
                     f"{mean(a['prune_time_s_four_ratios']):.2f} s / {mean(a['prune_stage_wall_s_four_ratios']):.1f} s | "
                     f"{mean(a['one_command_wall_s']):.1f} s | {a['one_command_vs_library_max_diff']:.1e} |")
    return lines


def figure(columns: int, width: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def save(fig, name: str, args: argparse.Namespace) -> None:
    with atomic_path(RESULTS / tag(args) / name) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_accuracy(arms: dict[str, Any], args: argparse.Namespace) -> None:
    fig, axes = figure(len(RECOVERIES))
    xs = [0.0, *args.ratios]
    for ax, recovery in zip(axes, RECOVERIES):
        for arm in sorted(arms):
            a = arms[arm]
            ys = [mean(a["dense"])] + [mean(a["after_prune"][f"{r:g}/{recovery}"]) for r in args.ratios]
            ax.plot(xs, [100 * y for y in ys], marker="o", color=COLOURS[arm], label=LABELS[arm])
            if recovery == "none" and a["bn_recalibrated_extra"]:
                extra = [mean(a["bn_recalibrated_extra"][f"{r:g}"]) for r in args.ratios]
                ax.plot(args.ratios, [100 * y for y in extra], ls=":", marker=".", color=COLOURS[arm], alpha=0.7)
        ax.set(xlabel="pruning ratio s′ (0 = dense)", title=f"no retraining, recovery: {recovery}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)  (dotted: BN-recalibrated extra)")
    axes[0].legend(fontsize=8)
    save(fig, "accuracy-vs-ratio.png", args)


def plot_histograms(rows: list[dict], args: argparse.Namespace) -> None:
    first = {row["arm"]: row for row in rows if row["seed"] == args.seeds[0]}
    fig, axes = figure(len(first), width=3.4)
    for ax, arm in zip(axes, sorted(first)):
        ax.stairs(first[arm]["histogram"], BINS, fill=True, color=COLOURS[arm])
        ax.set(yscale="log", xlabel="log10 |ŵ| (prunable convs)", title=LABELS[arm])
    axes[0].set_ylabel("entries")
    save(fig, "histograms.png", args)


def plot_energy(arms: dict[str, Any], args: argparse.Namespace) -> None:
    fig, axes = figure(len(ENERGY_SPARSITIES), width=6.0)
    for ax, s in zip(axes, ENERGY_SPARSITIES):
        for arm in sorted(arms):
            energy = arms[arm]["energy"][f"{s:g}"]
            ax.plot(range(len(energy)), list(energy.values()), marker=".", color=COLOURS[arm], label=LABELS[arm])
        ax.set(yscale="log", xlabel="prunable layer (network order, fc last)", ylabel="R_l (mean pruned energy)",
               title=f"pruned energy at s = {s:g}, end of training")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, "energy.png", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--replicated", nargs="*", default=["A", "C"], choices=list(ARMS),
                        help="arms run on every seed (the others on the first)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8])
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lam", type=float, default=None, help="λ of arms C and D (default: the recipes')")
    parser.add_argument("--bn-batches", type=int, default=4, help="training batches of the BN-recalibrated extra")
    parser.add_argument("--overhead-steps", type=int, default=20, help="steps per setting and round (0: skip)")
    parser.add_argument("--subset", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--parallel", type=int, default=2, help="(arm, seed) jobs at once (one process each)")
    parser.add_argument("--summary-only", action="store_true", help="summarise what is written; train nothing")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        arm, seed = args.one[0], int(args.one[1])
        write_json(arm_file(arm, seed, args), run_arm(arm, seed, args))
        return
    if not args.summary_only:
        launch_all(args)
    missing = [f"{arm}-seed{seed}" for arm, seed in jobs(args) if not arm_file(arm, seed, args).is_file()]
    if missing:
        raise SystemExit(f"not summarised: {', '.join(missing)} not finished (run without --summary-only)")
    rows = [json.loads(arm_file(arm, seed, args).read_text()) for arm, seed in jobs(args)]
    overhead_file = RESULTS / tag(args) / "overhead.json"
    if args.overhead_steps and not overhead_file.is_file() and not args.summary_only:
        from hyperspherical_overhead import measure

        write_json(overhead_file, measure(args.data_dir, steps=args.overhead_steps, subset=args.subset))
    overhead = json.loads(overhead_file.read_text()) if overhead_file.is_file() else None
    summarise(rows, args, overhead)


if __name__ == "__main__":
    main()
