"""Retraining after pruning: FT vs LR rewinding vs scaled restarting vs 1-cycle (METHODS §2.7).

    python benchmarks/nptm_experiment.py --data-dir ../shared/data [--seeds 0 1] [--budget 10]
                                         [--criteria l1 random] [--plans finetune lr_rewind ...]
                                         [--parallel 2]

1. The original training: recipes/nptm/dense.yaml (CIFAR-10 ResNet-20, T = 30 epochs, step
   schedule) run under runs/nptm/; its dense model and rewind points are copied to the committed
   checkpoint benchmarks/checkpoints/resnet20_cifar10_step30/ (with provenance.json). When that
   checkpoint exists it is reused and nothing is trained again.
2. Every arm is one of recipes/nptm/<plan>.yaml (the single definition of its LR plan and
   training settings) with ``prune.criterion`` l1 or random and ``retrain.epochs`` = the budget:
   one-shot filter pruning of the committed dense model (resnet20-B), compaction, retraining.
   Each (arm, seed) is its own resumable recipe run under runs/nptm/seed<S>/, ``--parallel`` at
   a time with one torch thread each; all rows go to runs/nptm/results.sqlite.
3. Writes benchmarks/results/nptm/: one JSON per (arm, seed), summary-t<budget>.json,
   table-t<budget>.md, lr-plans-t<budget>.png (the plans as trained) and curves-t<budget>.png.

``--summary-only`` summarises the (arm, seed) results already written and trains nothing (seeds
may then differ between arms; the table says how many each has). ``--subset N`` (a smoke test on the first N training images) retrains from the committed
checkpoint and keeps its runs and results apart, under runs/nptm/subsetN/ and
benchmarks/results/nptm/subsetN/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from machine import machine_info, precision_line
from processes import run_processes
from recipe_runs import run_or_resume
from prunekit.experiment.recipe import Recipe, load_recipe
from prunekit.experiment.runner import RESULT_FILE
from prunekit.io import atomic_path, write_json

RECIPES = Path("recipes/nptm")
RUNS = Path("runs/nptm")
SOURCE = "benchmarks/nptm_experiment.py"
RESULTS = Path("benchmarks/results/nptm")
CHECKPOINT = Path("benchmarks/checkpoints/resnet20_cifar10_step30")
# Arms, named by their recipe files (and result files); each arm's LR plan is its recipe's
# retrain.lr_plan: the same name, except the 1-cycle arm one_cycle, whose plan is cyclic_restart.
PLANS = ("finetune", "lr_rewind", "scaled_restart", "one_cycle")
OPTIONAL_PLANS = ("weight_rewind",)
CRITERIA = ("l1", "random")
LABELS = {"finetune": "FT", "lr_rewind": "LRW", "weight_rewind": "WR", "scaled_restart": "SLR",
          "one_cycle": "1-cycle"}
COLOURS = {"finetune": "grey", "lr_rewind": "C0", "weight_rewind": "C9", "scaled_restart": "C2",
           "one_cycle": "C3"}


# ------------------------------------------------------------------------ recipes
def data_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    return out + ([f"data.subset={args.subset}"] if args.subset else [])


def dense_recipe(args: argparse.Namespace) -> Recipe:
    return load_recipe(RECIPES / "dense.yaml", data_overrides(args))


def arm_recipe(criterion: str, plan: str, seed: int, args: argparse.Namespace) -> Recipe:
    """recipes/nptm/<plan>.yaml with the experiment's criterion, budget and seed."""
    return load_recipe(RECIPES / f"{plan}.yaml", [
        f"name=nptm_resnet20_{criterion}_{plan}", f"prune.criterion={criterion}",
        f"retrain.epochs={args.budget}", f"seeds=[{seed}]", *data_overrides(args)])


def runs_dir(args: argparse.Namespace) -> Path:
    return RUNS / f"subset{args.subset}" if args.subset else RUNS


def results_dir(args: argparse.Namespace) -> Path:
    return RESULTS / f"subset{args.subset}" if args.subset else RESULTS


# ---------------------------------------------------------------------- the dense model
def ensure_checkpoint(args: argparse.Namespace) -> dict:
    """The committed dense checkpoint's provenance; trains (or resumes) the dense recipe first when it is missing."""
    provenance = CHECKPOINT / "provenance.json"
    if provenance.is_file():
        return json.loads(provenance.read_text())
    if args.subset:
        raise SystemExit(f"--subset retrains the committed dense model, but {CHECKPOINT} is missing; "
                         "run without --subset first")
    recipe = dense_recipe(args)
    row = run_or_resume(recipe, RUNS, source=SOURCE)
    run_dir = Path(row["run_dir"])
    marker = json.loads((run_dir / "train" / "stage.json").read_text())
    staging = CHECKPOINT.with_name(CHECKPOINT.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "rewind").mkdir(parents=True)
    for name in ("model.json", "model.safetensors"):
        shutil.copy2(run_dir / "train" / name, staging / name)
    for point in sorted((run_dir / "train" / "rewind").glob("epoch-*.safetensors")):
        shutil.copy2(point, staging / "rewind" / point.name)
    info = {"recipe": str(RECIPES / "dense.yaml"), "recipe_digest": recipe.digest(), "seed": recipe.seeds[0],
            "command": "prunekit run recipes/nptm/dense.yaml (or this script, which runs it when the "
                       "checkpoint is missing)",
            "epochs": recipe.train.epochs, "test_acc": marker["dense_test_acc"],
            "test_acc_precision": recipe.evaluate.precision, "final_epoch_test_acc": marker["final_test_acc"],
            "rewind_points": sorted(recipe.train.rewind_points), "wall_time_s": marker["wall_time_s"],
            "git_commit": json.loads((run_dir / "run.json").read_text())["git_commit"], "machine": machine_info()}
    write_json(staging / "provenance.json", info)
    staging.rename(CHECKPOINT)
    return info


# --------------------------------------------------------------------------- the arms
def arm_file(criterion: str, plan: str, seed: int, args: argparse.Namespace) -> Path:
    return results_dir(args) / f"{criterion}-{plan}-t{args.budget}-seed{seed}.json"


def run_arm(criterion: str, plan: str, seed: int, args: argparse.Namespace) -> dict:
    recipe = arm_recipe(criterion, plan, seed, args)
    row = run_or_resume(recipe, runs_dir(args), source=SOURCE)
    run_dir = Path(row["run_dir"])
    prune = json.loads((run_dir / "prune" / "stage.json").read_text())
    retrain = json.loads((run_dir / "retrain" / "stage.json").read_text())
    history = [json.loads(line) for line in (run_dir / "retrain" / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run_dir / RESULT_FILE).read_text())
    return {"criterion": criterion, "plan": plan, "seed": seed, "budget": args.budget, "run_id": row["run_id"],
            "final_test_acc": result["final_test_acc"], "test_acc_after_prune": prune["test_acc_after_prune"],
            "params_removed": prune["params_removed"], "macs": result["macs"], "dense_macs": result["dense_macs"],
            "params": result["params"], "dense_params": result["dense_params"],
            "retrain_wall_time_s": retrain["wall_time_s"], "steps_per_epoch": retrain["steps_per_epoch"],
            "curve": [m["test_acc"] for m in history if "test_acc" in m],
            "precision": retrain["precision"], "machine": machine_info()}


def launch_all(args: argparse.Namespace) -> list[dict]:
    """Every (arm, seed) without a result file as its own process, ``--parallel`` at a time."""
    jobs = [(c, p, s) for s in args.seeds for c in args.criteria for p in args.plans]
    run_processes([[sys.executable, __file__, "--one", c, p, str(s), *forwarded(args)]
                   for c, p, s in jobs if not arm_file(c, p, s, args).is_file()], args.parallel)
    return [json.loads(arm_file(c, p, s, args).read_text()) for c, p, s in jobs]


def written(args: argparse.Namespace) -> list[dict]:
    """The (arm, seed) results already on disk for the requested seeds, criteria and plans."""
    files = [arm_file(c, p, s, args) for s in args.seeds for c in args.criteria for p in args.plans]
    rows = [json.loads(f.read_text()) for f in files if f.is_file()]
    if not rows:
        raise SystemExit(f"--summary-only: no results for these arms and seeds in {results_dir(args)}")
    return rows


def forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--budget", str(args.budget)]
    out += ["--subset", str(args.subset)] if args.subset else []
    return out + (["--data-dir", args.data_dir] if args.data_dir else [])


# -------------------------------------------------------------------------- summary
def summarise(rows: list[dict], dense: dict, args: argparse.Namespace) -> None:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["criterion"], row["plan"]), []).append(row)
    base = dense["test_acc"]
    lines = [f"| pruning | retraining (t = {args.budget}) | final test acc (mean ± std) | Δ vs dense | "
             "right after pruning | seeds | retrain wall time |", "|---|---|---|---|---|---|---|"]
    arms = {}
    for (criterion, plan), group in groups.items():
        accs = [r["final_test_acc"] for r in group]
        std = statistics.stdev(accs) if len(accs) > 1 else None
        mean = statistics.mean(accs)
        arms[f"{criterion}-{plan}"] = {"criterion": criterion, "plan": plan, "mean": mean, "std": std,
                                       "per_seed": {str(r["seed"]): r["final_test_acc"] for r in group},
                                       "after_prune": statistics.mean(r["test_acc_after_prune"] for r in group),
                                       "wall_time_s": statistics.mean(r["retrain_wall_time_s"] for r in group)}
        a = arms[f"{criterion}-{plan}"]
        spread = f" ± {100 * std:.2f}" if std is not None else ""
        lines.append(f"| {criterion} | {LABELS[plan]} ({plan}) | {100 * mean:.2f}{spread} % | "
                     f"{100 * (mean - base):+.2f} | {100 * a['after_prune']:.2f} % | {len(accs)} | "
                     f"{a['wall_time_s'] / 60:.1f} min |")
    paired = paired_differences(arms)
    if paired:
        lines += ["", "| comparison (the paper's claim) | mean difference | per seed (same data order) |",
                  "|---|---|---|"]
        lines += [f"| {name} | {100 * d['mean']:+.2f} | {', '.join(f's{k}: {100 * v:+.2f}' for k, v in d['per_seed'].items())} |"
                  for name, d in paired.items()]
    first = rows[0]
    lines += ["", f"Dense ResNet-20 (T = {dense['epochs']} epochs, seed {dense['seed']}): {100 * base:.2f} % "
              f"test accuracy. Pruned (resnet20-B): {first['params'] / first['dense_params']:.3f}x params, "
              f"{first['macs'] / first['dense_macs']:.3f}x MACs ({first['params_removed']:.1%} of params removed).", "",
              precision_line(rows, arm=lambda row: f"{row['criterion']} + {row['plan']}")]
    write_json(results_dir(args) / f"summary-t{args.budget}.json",
               {"budget": args.budget, "dense": dense, "arms": arms, "paired": paired, "runs": rows,
                "machine": machine_info()})
    with atomic_path(results_dir(args) / f"table-t{args.budget}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot_plans(rows, args)
    plot_curves(rows, base, args)
    print("\n".join(lines))


PAIRS = {  # (better arm, worse arm) as the paper predicts them
    "l1: LRW > FT": ("l1-lr_rewind", "l1-finetune"), "l1: SLR > FT": ("l1-scaled_restart", "l1-finetune"),
    "l1: 1-cycle > FT": ("l1-one_cycle", "l1-finetune"), "l1: 1-cycle >= SLR": ("l1-one_cycle", "l1-scaled_restart"),
    "l1: SLR ≈ LRW": ("l1-scaled_restart", "l1-lr_rewind"),
    "l1: LRW >= WR (Renda et al.)": ("l1-lr_rewind", "l1-weight_rewind"),
    "random + 1-cycle >= l1 + FT": ("random-one_cycle", "l1-finetune"),
    "random: 1-cycle > FT": ("random-one_cycle", "random-finetune"),
}


def paired_differences(arms: dict[str, dict]) -> dict[str, dict]:
    """Accuracy differences of the paper's comparisons over the seeds both arms ran."""
    out = {}
    for name, (better, worse) in PAIRS.items():
        if better not in arms or worse not in arms:
            continue
        a, b = arms[better]["per_seed"], arms[worse]["per_seed"]
        seeds = sorted(set(a) & set(b), key=int)
        if seeds:
            diffs = {seed: a[seed] - b[seed] for seed in seeds}
            out[name] = {"mean": statistics.mean(diffs.values()), "per_seed": diffs}
    return out


def plot_plans(rows: list[dict], args: argparse.Namespace) -> None:
    """The LR (and momentum) plans exactly as the arms trained them (same recipes, same steps per epoch)."""
    from prunekit.cli.lr_plan_cmd import plot_lr_plans
    from prunekit.train.lr_plans import build_lr_plan

    steps = rows[0]["steps_per_epoch"]
    plans = {}
    for plan in dict.fromkeys(r["plan"] for r in rows):
        spec = arm_recipe("l1", plan, rows[0]["seed"], args).retrain
        plans[spec.lr_plan] = build_lr_plan(spec.lr_plan, lr=spec.lr, epochs=spec.epochs,
                                            steps_per_epoch=steps, **spec.lr_plan_args)
    plot_lr_plans(plans, results_dir(args) / f"lr-plans-t{args.budget}.png",
                  title=f"retraining LR plans, t = {args.budget} epochs after T = 30 ({steps} steps per epoch)")


def plot_curves(rows: list[dict], dense_acc: float, args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    criteria = [c for c in CRITERIA if any(r["criterion"] == c for r in rows)]
    figure = Figure(figsize=(5.5 * len(criteria), 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = dict(zip(criteria, figure.subplots(1, len(criteria), sharey=True, squeeze=False)[0]))
    for criterion, ax in axes.items():
        for plan in dict.fromkeys(r["plan"] for r in rows):
            runs = [r for r in rows if r["criterion"] == criterion and r["plan"] == plan]
            for i, run in enumerate(runs):
                ax.plot(range(0, len(run["curve"]) + 1), [100 * run["test_acc_after_prune"]] +
                        [100 * a for a in run["curve"]], marker=".", color=COLOURS[plan], alpha=0.9 if i == 0 else 0.5,
                        label=LABELS[plan] if i == 0 else None)
        ax.axhline(100 * dense_acc, color="black", ls="--", lw=1, label="dense")
        ax.set(xlabel="retraining epoch (0 = right after pruning)", title=f"{criterion} filter pruning (resnet20-B)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[criteria[0]].set_ylabel("test accuracy (%)")
    low = min(100 * a for r in rows for a in r["curve"][len(r["curve"]) // 2:])
    axes[criteria[0]].set_ylim(low - 2, 100 * dense_acc + 1.5)
    with atomic_path(results_dir(args) / f"curves-t{args.budget}.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--budget", type=int, default=10, help="retraining epochs t (default 10 = a third of T)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS + OPTIONAL_PLANS)
    parser.add_argument("--subset", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--parallel", type=int, default=2, help="arms trained at once (one process each)")
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the results already written for these seeds, arms; train nothing")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        criterion, plan, seed = args.one[0], args.one[1], int(args.one[2])
        write_json(arm_file(criterion, plan, seed, args), run_arm(criterion, plan, seed, args))
        return
    dense = ensure_checkpoint(args)
    summarise(written(args) if args.summary_only else launch_all(args), dense, args)


if __name__ == "__main__":
    main()
