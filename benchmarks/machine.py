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


def precision_line(rows: list[dict], arm_key: str | None = None) -> str:
    """Which training precision the runs of a summary used, by seed, or by arm and seed when
    ``arm_key`` names the rows' arm field (rows from before the field say so)."""
    runs: dict[str, dict[str, set[int]]] = {}
    for row in rows:
        arm = str(row[arm_key]) + " " if arm_key else ""
        runs.setdefault(row.get("precision", "not recorded"), {}).setdefault(arm, set()).add(row["seed"])
    parts = []
    for precision in sorted(runs):
        groups = ", ".join(f"{arm}seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"
                           for arm, seeds in sorted(runs[precision].items()))
        parts.append(f"{precision} ({groups})")
    return "Training precision: " + "; ".join(parts) + "."
