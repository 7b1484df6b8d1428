"""CPU latency of models compacted to half their MACs, next to the MACs ratio, in one run.

    python benchmarks/compaction_latency.py [--models resnet56 tv:resnet18] [--repeats 20]

Each model (random init: latency does not depend on the weight values) is pruned with global,
per-layer-normalised L1 filter scores to ``macs=0.5`` and physically compacted (prunekit prune's
path). Dense and compacted latencies are the median of ``--repeats`` timed forwards after a
warm-up, at batch 1 and 32, fp32 (NCHW) and bf16 autocast (channels_last). Goal (issue 4):
speed-up at batch 32 >= 0.8x the MACs ratio. Writes benchmarks/results/compaction_latency.json.
"""

from __future__ import annotations

import argparse
import copy

import torch

from machine import machine_info
from prunekit.core.compaction import compact_masked
from prunekit.core.prune_once import prune_once
from prunekit.io import write_json
from prunekit.measure import count_macs
from prunekit.measure.latency import measure_latency
from prunekit.models import build_model

INPUTS = {"tv:": (3, 224, 224)}
DEFAULT_INPUT = (3, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "tv:resnet18"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/compaction_latency.json")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        shape = next((s for prefix, s in INPUTS.items() if name.startswith(prefix)), DEFAULT_INPUT)
        torch.manual_seed(0)
        dense = build_model(name, num_classes=10 if not name.startswith("tv:") else 1000).eval()
        compacted = copy.deepcopy(dense)
        example = torch.zeros(1, *shape)
        sparsifier = prune_once(compacted, example, target="macs=0.5", granularity="filter", scope="global")
        compact_masked(compacted, sparsifier.mask_set, example)
        macs_dense, macs_compact = count_macs(dense, shape).total, count_macs(compacted, shape).total
        for batch in (1, 32):
            for precision in ("fp32", "bf16"):
                timing = {label: measure_latency(model, shape, batch_size=batch, precision=precision,
                                                 channels_last=precision == "bf16", repeats=args.repeats,
                                                 warmup=5).median_ms
                          for label, model in (("dense", dense), ("compacted", compacted))}
                speedup = timing["dense"] / timing["compacted"]
                macs_ratio = macs_dense / macs_compact
                rows.append({"model": name, "input": "x".join(map(str, shape)), "batch": batch,
                             "precision": precision, "dense_ms": round(timing["dense"], 3),
                             "compacted_ms": round(timing["compacted"], 3), "speedup": round(speedup, 3),
                             "macs_ratio": round(macs_ratio, 3),
                             "speedup_over_macs_ratio": round(speedup / macs_ratio, 3)})
                print(f"{name:12s} b{batch:<3d} {precision}  dense {timing['dense']:8.2f} ms  compacted "
                      f"{timing['compacted']:8.2f} ms  speed-up {speedup:.2f}x  MACs ratio {macs_ratio:.2f}x  "
                      f"({speedup / macs_ratio:.2f} of it)", flush=True)
    write_json(args.out, {"rows": rows, "repeats": args.repeats, "machine": machine_info()})


if __name__ == "__main__":
    main()
