"""A short CUDA smoke run of the Trainer and every method, for a machine with a GPU.

    python benchmarks/cuda_smoke.py --data-dir ../shared/data [--subset 4096] [--device cuda] [--out FILE]

``prunekit train`` of ResNet-20 (2 epochs; the second epoch's images/s) and ``prunekit run`` of one
recipe per training path, shortened to 1 epoch on the first ``--subset`` CIFAR-10 training
images: gradual pruning (recipes/ocp/one_cycle.yaml), the hyperspherical penalty
(recipes/hyperspherical/hs_penalty_s0.5.yaml), AutoBot gates + fine-tune
(recipes/autobot/scatter.yaml) and LR rewinding (recipes/nptm/lr_rewind.yaml). Each must finish;
their status, accuracy, MACs and wall time go to ``--out`` (default
benchmarks/results/cuda_smoke.json) with the machine. ``--device cpu`` checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info
from prunekit.io import write_json

RECIPES = {"gradual": ("recipes/ocp/one_cycle.yaml", ["prune.train.epochs=1"]),
           "hyperspherical": ("recipes/hyperspherical/hs_penalty_s0.5.yaml", ["train.epochs=1"]),
           "autobot": ("recipes/autobot/scatter.yaml", ["retrain.epochs=1", "retrain.eval_every=1"]),
           "retraining": ("recipes/nptm/lr_rewind.yaml", ["retrain.epochs=1"])}


def prunekit(*args: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prunekit", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--subset", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_smoke.json"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        wall = prunekit("train", "--model", "resnet20", "--data", "cifar10", "--data-dir", args.data_dir,
                        "--subset", str(args.subset), "--epochs", "2", "--device", args.device, "--out", str(out / "t"))
        last = json.loads((out / "t" / "metrics.jsonl").read_text().splitlines()[-1])
        rows["trainer"] = {"images_per_s": last["images_per_s"], "test_acc": last["test_acc"], "wall_time_s": wall}
        print(f"trainer: {last['images_per_s']:.0f} img/s", flush=True)
        for name, (recipe, overrides) in RECIPES.items():
            sets = [*overrides, f"data.subset={args.subset}", f"data.data_dir={args.data_dir}", f"device={args.device}"]
            wall = prunekit("run", recipe, *[x for s in sets for x in ("--set", s)], "--out", str(out / name))
            (run_dir,) = (out / name).glob("*/s0")
            result = json.loads((run_dir / "result.json").read_text())
            rows[name] = {"recipe": recipe, "overrides": sets, "wall_time_s": wall,
                          **{k: result.get(k) for k in ("status", "final_test_acc", "sparsity", "macs", "dense_macs")}}
            print(f"{name}: {result['status']}, test acc {result['final_test_acc']:.4f}, {wall:.0f} s", flush=True)
    write_json(args.out, {"device": args.device, "subset": args.subset, "runs": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
