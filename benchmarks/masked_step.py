"""Training-step time with pruning masks enforced, against the dense step, in one run.

    python benchmarks/masked_step.py [--model resnet20] [--sparsity 0.9] [--steps 40] [--rounds 3]

Three variants of the same SGD step (batch 128, bf16 autocast + channels_last, the Trainer's
defaults here) on the same model: dense; prunekit's Sparsifier at ``--sparsity`` unstructured
(layer-wise L1 over every conv) enforced after each optimizer step (weights, gradients,
momentum); ``torch.nn.utils.prune.l1_unstructured`` on the same layers (weight recomputed as
weight_orig * mask in a forward pre-hook). Variants are timed in interleaved rounds and the
median step time of each is kept. Goal (issue 4): prunekit ≤ 1.05x dense. Writes
benchmarks/results/masked_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

from machine import machine_info
from prunekit.core.sparsifier import Sparsifier
from prunekit.device import autocast
from prunekit.io import write_json
from prunekit.models import build_model

BATCH = 128


def make_variant(kind: str, model_name: str, sparsity: float):
    torch.manual_seed(0)
    model = build_model(model_name)
    if kind == "torch.nn.utils.prune":  # before channels_last: its top-k .view() fails on NHWC weights
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                prune.l1_unstructured(module, "weight", amount=sparsity)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if kind != "prunekit":
        return model, optimizer, None
    sparsifier = Sparsifier(model, "weight", "l1", "local", types=(nn.Conv2d,))
    sparsifier.update(sparsity)
    return model, optimizer, lambda: sparsifier.enforce(optimizer)


def time_steps(model, optimizer, after_step, x, y, steps: int) -> list[float]:
    device = torch.device("cpu")
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        with autocast(device, "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/masked_step.json")
    args = parser.parse_args()

    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    kinds = ("dense", "prunekit", "torch.nn.utils.prune")
    variants = {k: make_variant(k, args.model, args.sparsity) for k in kinds}
    for variant in variants.values():
        time_steps(*variant, x, y, 5)  # warm-up
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind, variant in variants.items():
            times[kind] += time_steps(*variant, x, y, args.steps)
    median_ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {
        "model": args.model, "sparsity": args.sparsity, "batch_size": BATCH, "precision": "bf16+channels_last",
        "steps_per_variant": args.steps * args.rounds,
        "median_step_ms": {k: round(v, 2) for k, v in median_ms.items()},
        "ratio_to_dense": {k: round(v / median_ms["dense"], 3) for k, v in median_ms.items()},
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for kind in kinds:
        print(f"{kind:22s} {median_ms[kind]:7.1f} ms/step  {median_ms[kind] / median_ms['dense']:.3f}x dense")


if __name__ == "__main__":
    main()
