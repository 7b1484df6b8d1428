"""AutoBot's gate training (200 batches × 64) against one epoch of normal training, on this CPU.

    python benchmarks/autobot_gate_time.py --data-dir ../shared/data [--models resnet20 resnet56]
                                           [--gate-steps 200] [--epoch-steps N]

For each model, in one process and back to back: the method's own gate training (``autobot``
``prune`` with the paper's CIFAR settings: frozen network in eval mode, Adam on the gates, batch
64 of the augmented training set; its wall time is the Trainer's) and normal training (the
dense recipe's settings: SGD momentum 0.9, train mode, batch 128), in fp32 like the gate training
and in the recipes' precision (auto; the same run when auto is fp32 here), for ``--epoch-steps`` steps.
When either runs fewer steps than its full length (200 gate steps; an epoch is 391 steps of 128),
its full wall time is extrapolated from the measured time per step and marked so. Writes
benchmarks/results/autobot_gate_time.json with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from machine import machine_info
from prunekit.data import build_data
from prunekit.device import resolve_precision
from prunekit.io import write_json
from prunekit.methods import MethodContext, validate_method
from prunekit.models import build_model
from prunekit.train import TrainConfig, Trainer

RESULT = Path("benchmarks/results/autobot_gate_time.json")
GATE_STEPS, EPOCH_BATCH = 200, 128


def gate_training(name: str, steps: int, args: argparse.Namespace, run_dir: Path) -> dict:
    data = lambda **changes: build_data("cifar10", data_dir=args.data_dir, **changes)  # noqa: E731

    def fit(model, config, hooks, data=None):
        trainer = Trainer(model, data.train, data.test, config, hooks=hooks, run_dir=run_dir, device="cpu")
        return trainer, trainer.fit(resume=False)

    torch.manual_seed(0)
    method = validate_method({"method": "autobot", "target": "macs=0.55", "batches": steps})
    ctx = MethodContext(0, (3, 32, 32), torch.device("cpu"), data_factory=data, fit_fn=fit)
    summary = method.prune(build_model(name).eval(), ctx).summary
    seconds = summary["gate_training_wall_time_s"]
    return {"steps": steps, "batch_size": 64, "wall_time_s": seconds, "s_per_step": seconds / steps,
            "full_wall_time_s": seconds / steps * GATE_STEPS, "extrapolated": steps != GATE_STEPS}


def training_epoch(name: str, steps: int | None, precision: str, args: argparse.Namespace) -> dict:
    data = build_data("cifar10", data_dir=args.data_dir, batch_size=EPOCH_BATCH)
    per_epoch = len(data.train)
    steps = min(steps or per_epoch, per_epoch)
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, lr_plan="constant",
                         precision=precision)
    result = Trainer(build_model(name), data.train, None, config, device="cpu").fit(resume=False)
    return {"steps": steps, "batch_size": EPOCH_BATCH, "precision": precision, "steps_per_epoch": per_epoch, "wall_time_s": result.wall_time_s,
            "s_per_step": result.wall_time_s / steps, "full_wall_time_s": result.wall_time_s / steps * per_epoch,
            "extrapolated": steps != per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--gate-steps", type=int, default=GATE_STEPS)
    parser.add_argument("--epoch-steps", type=int, default=None, help="training steps measured (default: an epoch)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    began = time.perf_counter()
    rows = {}
    for name in args.models:
        run_dir = Path("runs/autobot_gate_time") / name
        gate = gate_training(name, args.gate_steps, args, run_dir)
        epoch = training_epoch(name, args.epoch_steps, "fp32", args)
        same = resolve_precision("auto", torch.device("cpu")) == "fp32"  # no fast bf16 on this CPU
        fast = epoch if same else training_epoch(name, args.epoch_steps, "auto", args)
        rows[name] = {"gate_training": gate, "training_epoch": epoch, "training_epoch_recipe_precision": fast,
                      "gate_training_vs_epoch": gate["full_wall_time_s"] / epoch["full_wall_time_s"],
                      "gate_training_vs_recipe_epoch": gate["full_wall_time_s"] / fast["full_wall_time_s"]}
        print(f"{name}: gate training {gate['full_wall_time_s']:.0f} s, one epoch {epoch['full_wall_time_s']:.0f} s "
              f"(fp32, ratio {rows[name]['gate_training_vs_epoch']:.3f}), {fast['full_wall_time_s']:.0f} s "
              f"(recipe precision, ratio {rows[name]['gate_training_vs_recipe_epoch']:.3f})")
    write_json(RESULT, {"models": rows, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                        "wall_time_s": time.perf_counter() - began,
                        "note": "gate training runs in fp32 (the method's setting); the epoch is measured in fp32 "
                                "and in the recipes' precision (auto: bf16 autocast + channels_last on this CPU)", "torch_threads": torch.get_num_threads(),
                                        "machine": machine_info(), "goal": "ResNet-20 gate training under 2 minutes",
                        "resnet20_goal_met": rows["resnet20"]["gate_training"]["full_wall_time_s"] < 120
                        if "resnet20" in rows else None})


if __name__ == "__main__":
    main()
