"""Training step time with the pruned-energy penalty vs plain training, measured in one run (METHODS §1.3.3).

    python benchmarks/hyperspherical_overhead.py --data-dir ../shared/data [--steps 20] [--rounds 3]

CIFAR-10 ResNet-20, batch 128, the Trainer's default precision and device (``auto``, as the
experiment trains). Three settings share one process and are timed in alternating rounds (so a
change of the machine's load hits all of them alike): standard convs, hyperspherical convs with
plain CE, hyperspherical convs + the penalty (the recipes' calibrated λ = 3, s = 0.5, exact top-k of every prunable layer at every step). A step is timed from the Trainer's
``on_step_begin`` to ``on_step_end`` (forward, loss with every extra term, backward, optimizer
step; data loading excluded); the first step of each round is dropped as warm-up. Goal: the
penalised step at most 1.15× the plain hyperspherical one. Writes
benchmarks/results/hyperspherical/overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from machine import machine_info
from prunekit.data import build_data
from prunekit.io import write_json
from prunekit.methods.hyperspherical import Hyperspherical, PrunedEnergyHook
from prunekit.models import build_model
from prunekit.train import Hook, TrainConfig, Trainer

RESULTS = Path("benchmarks/results/hyperspherical")
GOAL = 1.15


class StepTimer(Hook):
    """Seconds from ``on_step_begin`` to ``on_step_end`` of every step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.began = 0.0

    def on_step_begin(self, trainer: Trainer) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, trainer: Trainer, loss: torch.Tensor) -> None:
        self.times.append(time.perf_counter() - self.began)


def settings() -> dict[str, tuple[torch.nn.Module, list[Hook]]]:
    def model(convs: str) -> torch.nn.Module:
        torch.manual_seed(0)
        method = Hyperspherical.model_validate({"method": "hyperspherical", "ratio": 0.5, "convs": convs})
        return method.prepare(build_model("resnet20", num_classes=10))

    return {"standard": (model("standard"), []),
            "hyperspherical": (model("hyperspherical"), [PrunedEnergyHook(0.0, 0.5)]),
            "hyperspherical + penalty": (model("hyperspherical"), [PrunedEnergyHook(3.0, 0.5)])}


def measure(data_dir: str | None, steps: int = 20, rounds: int = 3, subset: int | None = None) -> dict:
    """Median step time of each setting and the penalty's ratios (see the module doc)."""
    data = build_data("cifar10", data_dir=data_dir, batch_size=128, seed=0, subset=subset)
    config = TrainConfig(steps=steps, lr=0.05, lr_plan="cosine")  # the experiment's precision: auto
    runs = settings()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, hooks) in runs.items():
            timer = StepTimer()
            trainer = Trainer(model, data.train, None, config, hooks=[*hooks, timer])
            trainer.fit(resume=False)
            times[name].extend(timer.times[1:])
    median = {name: statistics.median(values) for name, values in times.items()}
    penalised = median["hyperspherical + penalty"]
    return {"median_step_s": median, "steps_timed": {name: len(values) for name, values in times.items()},
            "penalty_vs_hyperspherical": penalised / median["hyperspherical"],
            "penalty_vs_standard": penalised / median["standard"], "goal": GOAL,
            "meets_goal": penalised / median["hyperspherical"] <= GOAL,
            "setup": f"CIFAR-10 ResNet-20, batch 128, {trainer.precision} on {trainer.device.type}, {rounds} "
                     f"alternating rounds of {steps} steps, "
                     "first step of each round dropped",
            "threads": torch.get_num_threads(), "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=20, help="steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None)
    args = parser.parse_args()
    result = measure(args.data_dir, args.steps, args.rounds, args.subset)
    write_json(RESULTS / "overhead.json", result)
    print(result)


if __name__ == "__main__":
    main()
