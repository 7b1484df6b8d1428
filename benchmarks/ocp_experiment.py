"""One-Cycle Pruning vs gradual-pruning baselines under one fixed budget (METHODS §3.6).

    python benchmarks/ocp_experiment.py --data-dir ../shared/data [--epochs 15] [--sparsity 0.9]
                                        [--seeds 0] [--arms dense one_shot iterative agp one_cycle]
                                        [--parallel 2]

The arms are the recipes in recipes/ocp/ (the single definition of each arm's schedule and
training settings; ``--epochs``/``--sparsity`` override them): CIFAR-10 ResNet-20 trained from
scratch with the same optimizer, LR plan, augmentation and precision in every arm, unstructured
layer-wise L1 magnitude pruning of every conv (first conv included, classifier dense, METHODS
§3.3), masks updated before each step when the schedule's target changes and enforced after each
step. Arms: one-shot at 40 % of the budget, iterative (3 steps) from 20 %, AGP from 20 % to the
end, One-Cycle (alpha 14, beta 5) over the whole run, and the dense reference (trained once per
seed and budget, shared by every sparsity). Each arm is its
own resumable run under runs/ocp/ (a killed experiment continues where it stopped; an arm's
result file is written only when its run finished, and finished arms are not started again).
The summary (summary-*.json, table-*.md, curves-*.png in benchmarks/results/ocp/) covers only
seeds on which every requested arm finished, with mean ± std per arm and the paper's paired
comparisons per seed (OCP > AGP, AGP > One-Shot, One-Shot > Iterative); ``--summary-only``
writes it from what is finished and names what is missing.
``--subset N`` (smoke tests on the first N training images) keeps its runs and results apart
(runs/ocp/subsetN/, benchmarks/results/ocp/subsetN/). The result files are what carries an
experiment over to a session whose runs/ folder is gone: commit them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from machine import machine_info, precision_line
from processes import run_processes
from prunekit.core.schedules import Schedule
from prunekit.data import build_data
from prunekit.experiment.recipe import Recipe, load_recipe
from prunekit.io import atomic_path, write_json
from prunekit.methods import MethodContext
from prunekit.models import build_model
from prunekit.train import Trainer

PRUNED_ARMS = ("one_shot", "iterative", "agp", "one_cycle")
RECIPES = Path("recipes/ocp")
RESULTS = Path("benchmarks/results/ocp")
RUNS = Path("runs/ocp")
COLOURS = {"dense": "black", "one_shot": "C0", "iterative": "C1", "agp": "C2", "one_cycle": "C3"}
CLAIMS = (("one_cycle", "agp"), ("agp", "one_shot"), ("one_shot", "iterative"))
"""The paper's orderings (METHODS §3.6): the first arm of each pair ahead of the second."""


def arm_recipe(arm: str, args: argparse.Namespace) -> Recipe:
    """The arm's recipe with the experiment's budget and final sparsity."""
    if arm == "dense":
        return load_recipe(RECIPES / "dense.yaml", [f"train.epochs={args.epochs}"])
    return load_recipe(RECIPES / f"{arm}.yaml", [f"prune.train.epochs={args.epochs}",
                                                 f"prune.target=weights={args.sparsity}"])


def arm_schedule(arm: str, args: argparse.Namespace) -> Schedule:
    return arm_recipe(arm, args).prune.sparsity_schedule()


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    bundle = build_data("cifar10", data_dir=args.data_dir, batch_size=128, seed=seed, subset=args.subset)
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=bundle.num_classes)
    recipe = arm_recipe(arm, args)
    run_dir = RUNS / arm_file(arm, seed, args).relative_to(RESULTS).with_suffix("")

    def fit(model, spec, hooks, data=None):
        data = data or bundle
        trainer = Trainer(model, data.train, data.test, spec.config(seed), hooks=hooks, run_dir=run_dir)
        return trainer, trainer.fit(resume=True)

    if arm == "dense":
        trainer, result = fit(model, recipe.train, [])
    else:  # the recipe's method itself, trained in this arm's folder
        context = MethodContext(seed, tuple(bundle.input_shape), torch.device("cpu"), fit_fn=fit)
        pruned = recipe.prune.prune(model, context)
        trainer, result = pruned.trainer, pruned.training
    conv = [m.weight for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    realised = sum(int((w == 0).sum()) for w in conv) / sum(w.numel() for w in conv)
    return {"arm": arm, "seed": seed, "final_test_acc": result.final_test_acc,
            "best_test_acc_optimistic": result.best_test_acc, "wall_time_s": result.wall_time_s,
            "conv_sparsity": realised, "curve": [m.test_acc for m in result.history],
            "sparsity_curve": [m.extra.get("sparsity_target", 0.0) for m in result.history],
            "precision": trainer.precision, "machine": machine_info()}


def launch_all(args: argparse.Namespace) -> list[dict]:
    """Run every (arm, seed) without a result file as its own process, ``--parallel`` at a time."""
    run_processes([[sys.executable, __file__, "--one", arm, "--seed-one", str(seed), *forwarded(args)]
                   for seed in args.seeds for arm in args.arms if not arm_file(arm, seed, args).is_file()],
                  args.parallel)
    return finished(args)


def finished(args: argparse.Namespace) -> list[dict]:
    """The result rows of the requested (arm, seed) pairs whose runs finished."""
    return [json.loads(arm_file(arm, seed, args).read_text()) for seed in args.seeds for arm in args.arms
            if arm_file(arm, seed, args).is_file()]


def forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--epochs", str(args.epochs), "--sparsity", str(args.sparsity)]
    out += ["--subset", str(args.subset)] if args.subset else []
    return out + (["--data-dir", args.data_dir] if args.data_dir else [])


def results_dir(args: argparse.Namespace) -> Path:
    """Where results go: smoke runs on a training subset are kept apart from the real ones."""
    return RESULTS / f"subset{args.subset}" if args.subset else RESULTS


def arm_file(arm: str, seed: int, args: argparse.Namespace) -> Path:
    """An arm's result; the dense reference does not depend on the sparsity, so it is trained once per seed."""
    budget = f"e{args.epochs}" if arm == "dense" else f"s{args.sparsity:g}-e{args.epochs}"
    return results_dir(args) / f"{arm}-{budget}-seed{seed}.json"


def complete_seeds(rows: list[dict], arms: list[str]) -> list[int]:
    """Seeds on which every arm in ``arms`` finished (only those are compared)."""
    done = {(r["arm"], r["seed"]) for r in rows}
    return sorted({r["seed"] for r in rows if all((arm, r["seed"]) in done for arm in arms)})


def paired(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per claim: the per-seed differences (first arm minus second) and whether it held on every seed."""
    acc = {(r["arm"], r["seed"]): r["final_test_acc"] for r in rows}
    out = []
    for first, second in CLAIMS:
        if all((arm, s) in acc for arm in (first, second) for s in seeds) and seeds:
            diffs = [acc[first, s] - acc[second, s] for s in seeds]
            out.append({"claim": f"{first} > {second}", "differences": dict(zip(seeds, diffs)),
                        "mean": statistics.mean(diffs), "held_on_every_seed": all(d > 0 for d in diffs)})
    return out


def summarise(rows: list[dict], args: argparse.Namespace) -> None:
    seeds = complete_seeds(rows, args.arms)
    missing = [f"{arm} seed {seed}" for seed in args.seeds for arm in args.arms
               if not any(r["arm"] == arm and r["seed"] == seed for r in rows)]
    if not seeds:
        raise SystemExit(f"no seed has every arm finished yet; missing: {', '.join(missing)}")
    rows = [r for r in rows if r["seed"] in seeds]
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    lines = ["| arm | final test acc (mean ± std) | seeds | conv sparsity | wall time per run |",
             "|---|---|---|---|---|"]
    summary = {}
    for arm, group in by_arm.items():
        accs = [r["final_test_acc"] for r in group]
        std = statistics.stdev(accs) if len(accs) > 1 else None
        summary[arm] = {"mean": statistics.mean(accs), "std": std, "seeds": len(accs),
                        "conv_sparsity": statistics.mean(r["conv_sparsity"] for r in group),
                        "wall_time_s": statistics.mean(r["wall_time_s"] for r in group)}
        s = summary[arm]
        spread = f" ± {100 * std:.2f}" if std is not None else ""
        lines.append(f"| {arm} | {100 * s['mean']:.2f}{spread} % | {len(accs)} | "
                     f"{100 * s['conv_sparsity']:.2f} % | {s['wall_time_s'] / 60:.0f} min |")
    claims = paired(rows, seeds)
    several = len(seeds) > 1
    lines += ["", f"Paired per-seed differences (seed{'s' if several else ''} {', '.join(map(str, seeds))}), "
              "in points:", ""]
    for claim in claims:
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in claim["differences"].values())
        held, where = claim["held_on_every_seed"], "on every seed" if several else "on the one seed"
        verdict = f"held {where}" if held else f"did not hold {where}"
        lines.append(f"- {claim['claim']}: {per_seed} (mean {100 * claim['mean']:+.2f}): {verdict}")
    lines += ["", precision_line(rows, arm=lambda row: row["arm"])]
    if missing:
        lines += ["", f"Not finished (left out of this summary): {', '.join(missing)}."]
    write_json(results_dir(args) / f"summary-s{args.sparsity:g}-e{args.epochs}.json",
               {"epochs": args.epochs, "sparsity": args.sparsity, "seeds": seeds, "arms": summary, "claims": claims,
                "missing": missing, "runs": rows, "summarised_on": machine_info(),
                "trained_on": [r.get("machine", "not recorded (before this field)") for r in rows]})
    with atomic_path(results_dir(args) / f"table-s{args.sparsity:g}-e{args.epochs}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(rows, args)
    print("\n".join(lines))


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    sparsity_axes, accuracy_axes = figure.subplots(1, 2)
    steps = 1000
    for arm in PRUNED_ARMS:
        schedule = arm_schedule(arm, args)
        p = [i / steps for i in range(steps + 1)]
        sparsity_axes.plot([x * args.epochs for x in p], [100 * schedule(x) for x in p], label=arm,
                           color=COLOURS[arm])
    sparsity_axes.set(xlabel="epoch", ylabel="target conv sparsity (%)",
                      title=f"sparsity schedules ({args.sparsity:.0%} final, {args.epochs} epochs)")
    for row in rows:
        if row["seed"] == rows[0]["seed"]:
            accuracy_axes.plot(range(1, len(row["curve"]) + 1), [100 * a for a in row["curve"]], marker=".",
                               label=row["arm"], color=COLOURS[row["arm"]])
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)",
                      title=f"ResNet-20 CIFAR-10 test accuracy (seed {rows[0]['seed']})")
    for axes in (sparsity_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    with atomic_path(results_dir(args) / f"curves-s{args.sparsity:g}-e{args.epochs}.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=["dense", *PRUNED_ARMS], choices=["dense", *PRUNED_ARMS])
    parser.add_argument("--subset", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--parallel", type=int, default=2, help="arms trained at once (one process each)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--summary-only", action="store_true", help="summarise the finished arms; train nothing")
    args = parser.parse_args()
    if args.one is not None:
        write_json(arm_file(args.one, args.seed_one, args), run_arm(args.one, args.seed_one, args))
        return
    summarise(finished(args) if args.summary_only else launch_all(args), args)


if __name__ == "__main__":
    main()
