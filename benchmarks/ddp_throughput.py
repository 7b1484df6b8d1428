"""Training images/s of one process vs two under torchrun (gloo), one torch thread each, in one run.

    python benchmarks/ddp_throughput.py --data-dir ../shared/data [--model resnet20] [--subset 4096] [--epochs 2]

Three ``prunekit train`` launches of the same model on the first ``--subset`` CIFAR-10 training
images, back to back: one process at batch 128; two processes at 128 per rank (global batch
256, PyTorch's convention); two at 64 per rank (global 128, the one process's batch). The figure
is the last epoch's training images/s over all ranks (the Trainer's own count and clock; the
first epoch holds the warm-up). Writes benchmarks/results/ddp_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info
from prunekit.io import write_json

RESULT = Path("benchmarks/results/ddp_throughput.json")
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def train(processes: int, batch: int, out: Path, args: argparse.Namespace) -> dict:
    """One ``prunekit train`` launch; its last epoch's figures."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    command = [sys.executable, *runner, "-m", "prunekit", "train", "--model", args.model, "--data", "cifar10",
               "--data-dir", args.data_dir, "--subset", str(args.subset), "--epochs", str(args.epochs),
               "--batch-size", str(batch), "--device", "cpu", "--out", str(out)]
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"processes": processes, "batch_per_rank": batch, "global_batch": batch * processes,
            "images_per_s": last["images_per_s"], "epoch_time_s": last["epoch_time_s"],
            "test_acc": last["test_acc"], "launch_wall_time_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--subset", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train(1, 128, Path(tmp) / "one", args), train(2, 128, Path(tmp) / "two-128", args),
                train(2, 64, Path(tmp) / "two-64", args)]
    one = rows[0]["images_per_s"]
    for row in rows:
        row["vs_one_process"] = row["images_per_s"] / one
        print(f"{row['processes']} process(es), batch {row['batch_per_rank']}/rank (global {row['global_batch']}): "
              f"{row['images_per_s']:.0f} img/s, {row['vs_one_process']:.2f}x one process")
    write_json(RESULT, {"model": args.model, "subset": args.subset, "epochs": args.epochs, "runs": rows,
                        "threads_per_process": 1, "backend": "gloo", "load_average_before": load_before,
                        "load_average_after": os.getloadavg(), "machine": machine_info()})


if __name__ == "__main__":
    main()
