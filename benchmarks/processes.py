"""Run benchmark jobs as separate processes, a few at a time, each with its share of the cores."""

from __future__ import annotations

import os
import subprocess


def run_processes(commands: list[list[str]], parallel: int) -> None:
    """Each command as its own process, ``parallel`` at a time, one torch thread per core share;
    stops at the first that fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // parallel))}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        if running[0].wait() != 0:
            raise SystemExit(f"job failed: {' '.join(map(str, running[0].args))}")
        running.pop(0)
