"""Run benchmark jobs as separate processes, a few at a time, each with its share of the cores."""

from __future__ import annotations

import os
import subprocess
import time


def run_processes(commands: list[list[str]], parallel: int, poll_s: float = 2.0) -> None:
    """Each command as its own process, ``parallel`` at a time (the next starts as soon as any one
    ends), one torch thread per core share; stops at the first that fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // parallel))}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        while all(process.poll() is None for process in running):
            time.sleep(poll_s)
        for process in [p for p in running if p.returncode is not None]:
            if process.returncode != 0:
                for other in running:
                    other.terminate()
                raise SystemExit(f"job failed: {' '.join(map(str, process.args))}")
            running.remove(process)
