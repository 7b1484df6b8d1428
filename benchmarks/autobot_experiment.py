"""AutoBot vs norm-based and random filter pruning at the same MACs (METHODS §4.9).

    python benchmarks/autobot_experiment.py --data-dir ../shared/data [--phase prune|finetune|all]
                                            [--parallel 2] [--summary-only]

Every arm is one recipe of recipes/autobot/ on the committed CIFAR-10 ResNet-20
(benchmarks/checkpoints/resnet20_cifar10_step30) at target macs=0.55 (45 % of the dense MACs
kept), compacted: AutoBot gates in the scatter and keep placements with gate-training seeds 0
and 1, and the baselines l1, l1_uniform and random (scatter placement, seed 0), all through the
same threshold bisection. Each arm runs twice, each time its own resumable `prunekit run`
recipe run under runs/autobot/seed<S>/:

* ``before`` — the recipe with ``retrain=null``: prune → compact → evaluate. Its accuracy is
  the one right after pruning (no BN recalibration, no fine-tuning); it also gives the achieved
  MACs and the gate-training wall time. ``--phase prune`` runs these, ``--parallel`` at a time.
* ``after`` — the recipe itself: the same pruning (again: the run checks it reproduces the
  ``before`` model's accuracy) and the 5-epoch §4.7 fine-tune. ``--phase finetune`` runs these,
  ``--parallel`` at a time, each with one torch thread.

An arm's result file (benchmarks/results/autobot/<arm>-seed<S>-<variant>.json) is written only
when its run finished, so a killed experiment is continued by running the same command again
(each run resumes from its last stage and epoch). The summary (summary.json, table.md,
kept_fractions.png) covers the finished runs and lists the ones still missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from machine import machine_info
from processes import run_processes
from recipe_runs import run_or_resume
from prunekit.experiment.recipe import Recipe, load_recipe
from prunekit.experiment.runner import RESULT_FILE
from prunekit.io import atomic_path, write_json

RECIPES = Path("recipes/autobot")
RUNS = Path("runs/autobot")
RESULTS = Path("benchmarks/results/autobot")
CHECKPOINT = Path("benchmarks/checkpoints/resnet20_cifar10_step30")
ARMS = (("scatter", 0), ("l1", 0), ("l1_uniform", 0), ("random", 0), ("keep", 0), ("scatter", 1), ("keep", 1))
"""(recipe, seed) in the order they run: the paper's comparison first."""
VARIANTS = ("before", "after")
LABELS = {"scatter": "AutoBot (scatter)", "keep": "AutoBot (keep)", "l1": "L1, global (normalised per layer)",
          "l1_uniform": "L1, uniform per layer", "random": "random"}
COLOURS = {"scatter": "C3", "keep": "C1", "l1": "C0", "l1_uniform": "C2", "random": "grey"}
AUTOBOT = ("scatter", "keep")


def recipe_for(arm: str, seed: int, variant: str, args: argparse.Namespace) -> Recipe:
    overrides = [f"seeds=[{seed}]"] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    if variant == "before":
        overrides += ["retrain=null", f"name=autobot_{arm}_before"]
    return load_recipe(RECIPES / f"{arm}.yaml", overrides)


def result_file(arm: str, seed: int, variant: str) -> Path:
    return RESULTS / f"{arm}-seed{seed}-{variant}.json"


def run_arm(arm: str, seed: int, variant: str, args: argparse.Namespace) -> dict:
    """Run (or continue) one arm's recipe run; the figures of its result file."""
    row = run_or_resume(recipe_for(arm, seed, variant, args), RUNS, source="benchmarks/autobot_experiment.py")
    run_dir = Path(row["run_dir"])
    prune = json.loads((run_dir / "prune" / "stage.json").read_text())
    result = json.loads((run_dir / RESULT_FILE).read_text())
    out = {"arm": arm, "seed": seed, "variant": variant, "run_id": row["run_id"],
           "test_acc": result["final_test_acc"], "test_acc_after_prune": prune["test_acc_after_prune"],
           "macs": result["macs"], "dense_macs": result["dense_macs"], "target_macs": prune["target_macs"],
           "params": result["params"], "dense_params": result["dense_params"],
           "gate_training_wall_time_s": prune.get("gate_training_wall_time_s"), "gate_steps": prune.get("gate_steps"),
           "threshold": prune["threshold"], "threshold_iterations": prune["threshold_iterations"],
           "kept_channels": prune["kept_channels"], "max_abs_diff_vs_gated": prune["max_abs_diff_vs_gated"],
           "prune_wall_time_s": prune.get("wall_time_s")}
    if variant == "after":
        retrain = json.loads((run_dir / "retrain" / "stage.json").read_text())
        out.update(retrain_wall_time_s=retrain["wall_time_s"], retrain_epochs=retrain["epochs"],
                   retrain_final_test_acc=retrain["final_test_acc"])
    return out


def launch(jobs: list[tuple[str, int, str]], parallel: int, args: argparse.Namespace) -> None:
    """Every job without a result file as its own process, ``parallel`` at a time."""
    run_processes([[sys.executable, __file__, "--one", arm, str(seed), variant, *forwarded(args)]
                   for arm, seed, variant in jobs if not result_file(arm, seed, variant).is_file()], parallel)


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--data-dir", args.data_dir] if args.data_dir else []


# -------------------------------------------------------------------------- summary
def summarise() -> None:
    rows = {(a, s, v): json.loads(result_file(a, s, v).read_text())
            for a, s in ARMS for v in VARIANTS if result_file(a, s, v).is_file()}
    missing = [f"{a} seed {s} {v}" for a, s in ARMS for v in VARIANTS if (a, s, v) not in rows]
    if not rows:
        raise SystemExit("no finished arm yet")
    provenance = json.loads((CHECKPOINT / "provenance.json").read_text())
    any_row = next(iter(rows.values()))
    dense_macs, target = any_row["dense_macs"], any_row["target_macs"]
    lines = ["| arm | gate seed | MACs kept (vs target) | acc. right after pruning | acc. after 5-epoch fine-tune | "
             "gate training |", "|---|---|---|---|---|---|"]
    arms = {}
    for arm, seed in ARMS:
        before, after = rows.get((arm, seed, "before")), rows.get((arm, seed, "after"))
        if before is None and after is None:
            continue
        some = before or after
        entry = {"arm": arm, "seed": seed, "macs": some["macs"], "macs_vs_target": some["macs"] / target - 1,
                 "before": before["test_acc"] if before else None, "after": after["test_acc"] if after else None,
                 "gate_training_wall_time_s": some["gate_training_wall_time_s"],
                 "reproduced": (after["test_acc_after_prune"] == before["test_acc"]) if before and after else None}
        arms[f"{arm}-seed{seed}"] = entry
        gate = (f"{entry['gate_training_wall_time_s']:.0f} s" if entry["gate_training_wall_time_s"] is not None
                else "none")
        lines.append(f"| {LABELS[arm]} | {seed if arm in AUTOBOT else '-'} | {some['macs'] / dense_macs:.4f} "
                     f"({100 * entry['macs_vs_target']:+.2f} %) | {cell(entry['before'])} | {cell(entry['after'])} | "
                     f"{gate} |")
    claims = claim_lines(arms)
    lines += ["", f"Dense ResNet-20: {100 * provenance['test_acc']:.2f} % test accuracy, {dense_macs:,} MACs; target "
              f"{target:,} MACs (45 %). MACs are counted on the compacted models.", *claims]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    write_json(RESULTS / "summary.json", {"dense_test_acc": provenance["test_acc"], "dense_macs": dense_macs,
                                          "target_macs": target, "arms": arms, "runs": list(rows.values()),
                                          "missing": missing, "machine": machine_info()})
    with atomic_path(RESULTS / "table.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot_kept(rows)
    print("\n".join(lines))


def cell(accuracy: float | None) -> str:
    return f"{100 * accuracy:.2f} %" if accuracy is not None else "not run yet"


def claim_lines(arms: dict[str, dict]) -> list[str]:
    """AutoBot (scatter, mean over seeds) minus the best baseline, before and after fine-tuning."""
    out = []
    for when in ("before", "after"):
        ours = [a[when] for a in arms.values() if a["arm"] == "scatter" and a[when] is not None]
        base = {a["arm"]: a[when] for a in arms.values() if a["arm"] not in AUTOBOT and a[when] is not None}
        if ours and base:
            best = max(base, key=base.get)
            out.append(f"{when} fine-tuning: AutoBot (scatter, mean of {len(ours)} seed(s)) "
                       f"{100 * statistics.mean(ours):.2f} % vs best baseline {best} {100 * base[best]:.2f} %: "
                       f"{100 * (statistics.mean(ours) - base[best]):+.2f} points.")
    return out


def plot_kept(rows: dict[tuple[str, int, str], dict]) -> None:
    """Kept fraction of every gate vector (ResNet-20 order), one line per arm (seed 0 solid, 1 dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    names = max((list(row["kept_channels"]) for row in rows.values()), key=len)  # scatter: conv1 and conv2
    for (arm, seed, variant), row in rows.items():
        if variant != "before" and (arm, seed, "before") in rows:
            continue
        kept = row["kept_channels"]
        ax.plot([names.index(n) for n in kept], [k / c for k, c in kept.values()], marker="o", ms=3,
                color=COLOURS[arm], ls="-" if seed == 0 else "--", label=f"{LABELS[arm]}, seed {seed}")
    ax.set_xticks(range(len(names)), [n.replace("layer", "L") for n in names], rotation=60, fontsize=7)
    ax.set(ylabel="kept fraction of the filters", ylim=(0, 1.05),
           title="ResNet-20 at 45 % of the dense MACs: filters kept per gated conv")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    with atomic_path(RESULTS / "kept_fractions.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--phase", choices=("prune", "finetune", "all"), default="all")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one torch thread each")
    parser.add_argument("--summary-only", action="store_true", help="summarise the finished runs; run nothing")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        arm, seed, variant = args.one[0], int(args.one[1]), args.one[2]
        write_json(result_file(arm, seed, variant), run_arm(arm, seed, variant, args))
        return
    if not args.summary_only:
        if args.phase in ("prune", "all"):
            launch([(a, s, "before") for a, s in ARMS], args.parallel, args)
        if args.phase in ("finetune", "all"):
            launch([(a, s, "after") for a, s in ARMS], args.parallel, args)
    summarise()


if __name__ == "__main__":
    main()
