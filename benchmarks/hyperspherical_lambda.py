"""λ calibration of the pruned-energy penalty (METHODS §1.3.3): short runs, largest λ within 0.5 point.

    python benchmarks/hyperspherical_lambda.py --data-dir ../shared/data [--epochs 5]
        [--lams 0 0.1 0.3 1 3 10] [--sparsity 0.5] [--seed 0] [--subset N] [--parallel 2] [--summary-only]

Each λ is one run of recipes/hyperspherical/hs_penalty_s<sparsity>.yaml with ``prune.lam`` = λ and
``train.epochs`` = the short budget (λ = 0 is the unpenalised reference: hyperspherical convs, plain
CE), resumable per epoch under runs/hyperspherical/lambda-<tag>/. A finished λ's row (dense
accuracy, accuracy right after pruning at the penalty's sparsity with no retraining, mean pruned
energy at the end of training) is written to benchmarks/results/hyperspherical/lambda-<tag>/
lam<λ>.json; a λ with a row file is not trained again, so committed rows carry a sweep over
sessions whose runs/ folder is gone. Only when every requested λ has its row are the table and the
choice written (benchmarks/results/hyperspherical/lambda-<tag>.json and .md): the largest λ whose
dense accuracy is within 0.5 point of λ = 0 (:func:`prunekit.methods.hyperspherical.pick_lambda`).
Use the chosen λ for the experiment with ``hyperspherical_experiment.py --lam λ`` or put it in the
recipes. With ``--parallel N`` the λ without a row train as N processes at a time (one torch thread
each on two cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hyperspherical_experiment import RECIPES, RESULTS, RUNS, stage
from recipe_runs import run_or_resume
from machine import machine_info
from processes import run_processes
from prunekit.experiment.recipe import load_recipe
from prunekit.io import atomic_path, write_json
from prunekit.methods.hyperspherical import LAMBDA_TOLERANCE, pick_lambda


def run_lam(lam: float, args: argparse.Namespace) -> dict:
    """λ's short run (run or resumed) and its row, written to its row file."""
    extra = [f"prune.lam={lam}", f"train.epochs={args.epochs}", f"seeds=[{args.seed}]"]
    extra += [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    extra += [f"data.subset={args.subset}"] if args.subset else []
    recipe = load_recipe(RECIPES / f"hs_penalty_s{args.sparsity:g}.yaml", extra)
    run_dir = Path(run_or_resume(recipe, RUNS / f"lambda-{tag(args)}", source="benchmarks/hyperspherical_lambda.py")["run_dir"])
    last = json.loads((run_dir / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    train = stage(run_dir, "train")
    row = {"lam": lam, "dense_test_acc": train["dense_test_acc"], "precision": train["precision"],
           "test_acc_after_prune": stage(run_dir, "prune")["test_acc_after_prune"],
           "pruned_energy_mean": last["extra"]["pruned_energy_mean"], "run_dir": str(run_dir),
           "recipe_digest": recipe.digest(), "machine": machine_info()}
    write_json(row_file(lam, args), row)
    return row


def row_file(lam: float, args: argparse.Namespace) -> Path:
    return RESULTS / f"lambda-{tag(args)}" / f"lam{lam:g}.json"


def launch_all(args: argparse.Namespace) -> None:
    """Every λ without a row as its own process, ``--parallel`` at a time."""
    common = ["--epochs", str(args.epochs), "--sparsity", str(args.sparsity), "--seed", str(args.seed)]
    common += (["--data-dir", args.data_dir] if args.data_dir else []) + (["--subset", str(args.subset)] if args.subset else [])
    run_processes([[sys.executable, __file__, "--one", str(lam), *common]
                   for lam in args.lams if not row_file(lam, args).is_file()], args.parallel)


def calibrate(args: argparse.Namespace) -> dict:
    """Every λ's row (trained here when missing); the table and the chosen λ."""
    rows = [json.loads(row_file(lam, args).read_text()) if row_file(lam, args).is_file() else run_lam(lam, args)
            for lam in args.lams]
    chosen = pick_lambda({row["lam"]: row["dense_test_acc"] for row in rows})
    return {"sparsity": args.sparsity, "epochs": args.epochs, "subset": args.subset, "seed": args.seed,
            "tolerance": LAMBDA_TOLERANCE, "chosen_lam": chosen, "rows": rows, "machine": machine_info()}


def tag(args: argparse.Namespace) -> str:
    return f"s{args.sparsity:g}-e{args.epochs}" + (f"-subset{args.subset}" if args.subset else "")


def report(result: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"λ calibration: hyperspherical ResNet-20 + penalty at s = {args.sparsity:g}, {args.epochs} epochs"
             + (f", first {args.subset} training images" if args.subset else "") + f", seed {args.seed}", "",
             f"| λ | dense test acc | Δ vs λ=0 | right after pruning at {args.sparsity:g} | mean pruned energy |",
             "|---|---|---|---|---|"]
    reference = next(r["dense_test_acc"] for r in result["rows"] if r["lam"] == 0)
    for r in result["rows"]:
        mark = " ← chosen" if r["lam"] == result["chosen_lam"] else ""
        lines.append(f"| {r['lam']:g}{mark} | {100 * r['dense_test_acc']:.2f} % | "
                     f"{100 * (r['dense_test_acc'] - reference):+.2f} | {100 * r['test_acc_after_prune']:.2f} % | "
                     f"{r['pruned_energy_mean']:.2e} |")
    lines += ["", f"Chosen: λ = {result['chosen_lam']:g}, the largest within {100 * LAMBDA_TOLERANCE:.1f} point "
                  "of λ = 0's dense accuracy.", "",
              "Training precision: " + ", ".join(sorted({r.get("precision", "not recorded") for r in result["rows"]})) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--sparsity", type=float, default=0.5, choices=[0.5, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--parallel", type=int, default=1, help="λ runs at once (one process each)")
    parser.add_argument("--summary-only", action="store_true", help="write the table from the row files; train nothing")
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        run_lam(args.one, args)
        return
    if 0.0 not in args.lams:
        parser.error("--lams: include 0 (the unpenalised reference)")
    if args.summary_only:
        missing = [f"{lam:g}" for lam in args.lams if not row_file(lam, args).is_file()]
        if missing:
            raise SystemExit(f"not summarised: λ = {', '.join(missing)} not finished (run without --summary-only)")
    elif args.parallel > 1:
        launch_all(args)
    result = calibrate(args)
    lines = report(result, args)
    write_json(RESULTS / f"lambda-{tag(args)}.json", result)
    with atomic_path(RESULTS / f"lambda-{tag(args)}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
