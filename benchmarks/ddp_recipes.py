"""Two short real recipes under torchrun (2 CPU processes, gloo) against one process: same outputs.

    python benchmarks/ddp_recipes.py --data-dir ../shared/data [--subset 4096]

A gradual-pruning recipe (recipes/ocp/one_cycle.yaml, 1 epoch) and a retraining one
(recipes/nptm/lr_rewind.yaml from the committed dense checkpoint, 1 retraining epoch), each on the
first ``--subset`` CIFAR-10 training images, run by ``prunekit run`` once in one process and once
under ``torchrun --nproc-per-node 2`` (one torch thread per process, same per-rank batch). Checks
that both finish, that they wrote the same files with the same result and metrics keys, and
records both results in benchmarks/results/ddp_recipes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine_info
from prunekit.io import write_json

RESULT = Path("benchmarks/results/ddp_recipes.json")
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RECIPES = {"gradual": ("recipes/ocp/one_cycle.yaml", ["prune.train.epochs=1"]),
           "retraining": ("recipes/nptm/lr_rewind.yaml", ["retrain.epochs=1"])}
KEPT = ("status", "final_test_acc", "sparsity", "macs", "params", "wall_time_s")


def run(recipe: str, overrides: list[str], processes: int, out: Path, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    sets = [x for o in [*overrides, f"data.subset={args.subset}", f"data.data_dir={args.data_dir}"] for x in ("--set", o)]
    subprocess.run([sys.executable, *runner, "-m", "prunekit", "run", recipe, *sets, "--out", str(out)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    (run_dir,) = out.glob("*/s0")
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != ".lock")
    result = json.loads((run_dir / "result.json").read_text())
    metrics = {str(p.relative_to(run_dir)): sorted(json.loads(p.read_text().splitlines()[-1]))
               for p in sorted(run_dir.rglob("metrics.jsonl"))}
    return {"files": files, "result_keys": sorted(result), "metrics_keys": metrics,
            "result": {k: result.get(k) for k in KEPT}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--subset", type=int, default=4096)
    args = parser.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, overrides) in RECIPES.items():
            one = run(recipe, overrides, 1, Path(tmp) / f"{name}-1", args)
            two = run(recipe, overrides, 2, Path(tmp) / f"{name}-2", args)
            same = {key: one[key] == two[key] for key in ("files", "result_keys", "metrics_keys")}
            summary[name] = {"recipe": recipe, "overrides": overrides, "same": same,
                             "one_process": one["result"], "two_processes": two["result"]}
            print(f"{name}: same files/result keys/metrics keys: {same}; test acc 1 process "
                  f"{one['result']['final_test_acc']:.4f}, 2 processes {two['result']['final_test_acc']:.4f}")
    write_json(RESULT, {"subset": args.subset, "recipes": summary, "threads_per_process": 1, "backend": "gloo",
                        "machine": machine_info()})
    if not all(all(s["same"].values()) for s in summary.values()):
        raise SystemExit("the 2-process runs wrote other files or keys than the 1-process runs")


if __name__ == "__main__":
    main()
