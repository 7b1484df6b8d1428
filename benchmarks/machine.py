"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import torch


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU features that decide how fast bf16 and fp32 training run (Linux /proc/cpuinfo names)."""


def cpu_model_and_flags(cpuinfo: str) -> tuple[str | None, list[str]]:
    """The first ``model name`` of a /proc/cpuinfo text and which of ``MATMUL_FLAGS`` it lists."""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 None)
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return model, [flag for flag in MATMUL_FLAGS if flag in flags]


def machine_info() -> dict[str, object]:
    cpu, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as handle:
            model, flags = cpu_model_and_flags(handle.read())
        cpu = model or cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def precision_line(rows: list[dict], arm: Callable[[dict], str] | None = None) -> str:
    """Which training precision the runs of a summary used: by seed when every seed's runs share
    one, else by seed and ``arm(row)``, arms with the same seeds listed together (rows from before
    the field say "not recorded")."""
    by_seed: dict[int, set[str]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], set()).add(row.get("precision", "not recorded"))
    per_arm = arm is not None and any(len(precisions) > 1 for precisions in by_seed.values())
    runs: dict[str, dict[str, set[int]]] = {}
    for row in rows:
        name = arm(row) if per_arm else ""
        runs.setdefault(row.get("precision", "not recorded"), {}).setdefault(name, set()).add(row["seed"])
    parts = []
    for precision in sorted(runs):
        arms_by_seeds: dict[tuple[int, ...], list[str]] = {}
        for name, seeds in sorted(runs[precision].items()):
            arms_by_seeds.setdefault(tuple(sorted(seeds)), []).append(name)
        groups = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
                  + (f" of {', '.join(names)}" if per_arm else "")
                  for seeds, names in sorted(arms_by_seeds.items(), key=lambda item: (-len(item[0]), item))]
        parts.append(f"{precision} ({' and '.join(groups)})")
    return "Training precision: " + "; ".join(parts) + "."
