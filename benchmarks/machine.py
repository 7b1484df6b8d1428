"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform

import torch


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def precision_line(rows: list[dict]) -> str:
    """Which training precision the runs of a summary used, by seed (rows from before the field say so)."""
    seeds: dict[str, set[int]] = {}
    for row in rows:
        seeds.setdefault(row.get("precision", "not recorded"), set()).add(row["seed"])
    parts = [f"{precision} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))})"
             for precision, s in sorted(seeds.items())]
    return "Training precision: " + "; ".join(parts) + "."
