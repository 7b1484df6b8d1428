"""Time and peak memory to reach ``macs=0.5``, before and after the per-layer cost table, in one run.

    python benchmarks/macs_search.py --before-src <checkout of the old code>/src

For CIFAR ResNet-56 and MobileNetV2 (32 px) and torchvision vgg16_bn and resnet50 (224 px), in
global and local scope, each measured in its own process (peak RSS from ``os.wait4``) with the
old code (``--before-src``, first on PYTHONPATH) and with this checkout's:

* **search**: from the prunable layers to the filter masks, as ``prune_once`` does it (the
  ``MacsOf`` counter, the uniform share bisection in local scope, the MACs bisection in
  global scope); the process also builds the model and finds the layers (not timed).
* **process**: the whole ``prunekit prune <dense dir> --target macs=0.5 --scope S`` command;
  ``imports_only`` is the floor of any such process (importing torch, torchvision, prunekit).

Wall and CPU seconds are both recorded: on a shared machine CPU seconds are the fairer
comparison (the ratios use them).
With ``--phases``, where the time of this checkout's whole process goes (same steps as the
CLI, timed one by one). Goal (issue 10): search under 5 s, process under 15 s and 4 GB.
Writes benchmarks/results/macs_search.json.
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

REPO = Path(__file__).resolve().parents[1]
CASES = [("resnet56", 32), ("mobilenetv2", 32), ("tv:vgg16_bn", 224), ("tv:resnet50", 224)]
SCOPES = ("global", "local")
TARGET = 0.5


# ----------------------------------------------------------------- children
def _model_and_input(name: str, side: int):
    import torch

    from prunekit.models import build_model

    torch.manual_seed(0)
    return build_model(name, num_classes=1000 if name.startswith("tv:") else 10).eval(), torch.zeros(1, 3, side, side)


def child_search(name: str, side: int, scope: str) -> dict:
    """The search of ``prune_once`` (whichever MacsOf the code on the path offers)."""
    import torch

    from prunekit.core import targets
    from prunekit.core.sparsifier import Sparsifier

    layers_of, share_of = _layer_and_share_functions()
    model, x = _model_and_input(name, side)
    layers = layers_of(model, x)
    make = getattr(targets, "table_macs", None) or targets.compacted_macs
    start, cpu = time.perf_counter(), time.process_time()
    macs_of = make(model, x)
    sparsifier = Sparsifier(model, "filter", "l1", scope, layers, macs_of=macs_of, normalize=scope == "global")
    target = share_of(sparsifier, TARGET, macs_of) if scope == "local" and share_of else f"macs={TARGET}"
    keep = sparsifier.plan(target)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    dense = macs_of({n: torch.ones_like(m) for n, m in keep.items()})
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "counter": make.__name__,
            "achieved": round(macs_of(keep) / dense, 5)}


def _layer_and_share_functions():
    """``filter_prunable_layers`` and, in the code before the plug-in interface, the local-scope share
    bisection the CLI called itself (now a Sparsifier plan: None)."""
    try:
        from prunekit.core.layers import filter_prunable_layers
        return filter_prunable_layers, None
    except ImportError:
        from prunekit.core.oneshot import filter_prunable_layers, uniform_fraction_for_macs
        return filter_prunable_layers, uniform_fraction_for_macs


def child_phases(name: str, side: int, scope: str) -> dict:
    """This checkout's ``prunekit prune`` steps, one timer each (the CLI's order): CPU seconds."""
    import torch

    from prunekit.core.compaction import compact
    from prunekit.core.sparsifier import Sparsifier
    from prunekit.core.targets import table_macs
    from prunekit.measure import count_macs

    times: dict[str, float] = {}

    def timed(label, fn, *args, **kwargs):
        start = time.process_time()
        out = fn(*args, **kwargs)
        times[label] = round(time.process_time() - start, 3)
        return out

    model, x = _model_and_input(name, side)
    timed("count_macs before", count_macs, model, x)
    filter_prunable_layers, share_of = _layer_and_share_functions()
    layers = timed("channel groups (filter_prunable_layers)", filter_prunable_layers, model, x)
    macs_of = timed("cost table (channel groups again + trace)", table_macs, model, x)
    sparsifier = Sparsifier(model, "filter", "l1", scope, layers, macs_of=macs_of, normalize=scope == "global")
    if scope == "local" and share_of:
        target = timed("uniform share bisection", share_of, sparsifier, TARGET, macs_of)
    else:
        target = f"macs={TARGET}"
    timed("masks (plan + update)", sparsifier.update, target)
    keep = {n: m.nonzero().flatten() for n, m in sparsifier.unit_masks().items()}
    sparsifier.squash()
    timed("compaction (graph + removal + check)", compact, model, keep, x)
    timed("count_macs after", count_macs, model, x)
    return {"cpu_seconds": times, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------ parent
def _measure(command: list[str], src: Path, timeout: float) -> dict:
    """Wall time and peak RSS (``os.wait4``) of one child process with ``src`` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"error": f"timed out after {timeout:g} s"}
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    if proc.returncode != 0:
        return {"error": stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **(json.loads(lines[-1]) if lines else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-src", type=Path, help="src/ of a checkout of the old code (required)")
    parser.add_argument("--models", nargs="+", default=[name for name, _ in CASES], help="a subset of the cases")
    parser.add_argument("--phases", action="store_true", help="also time this checkout's prune steps")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per child process")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/macs_search.json")
    parser.add_argument("--child", choices=("search", "phases"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scope", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_search if args.child == "search" else child_phases
        print(json.dumps(child(args.model, args.side, args.scope)), flush=True)
        return
    if args.before_src is None:
        parser.error("--before-src is required")

    from machine import machine_info
    from prunekit.artifact import ModelSpec, save_artifact
    from prunekit.io import write_json

    sources = {"before": args.before_src.resolve(), "after": REPO / "src"}
    load = [os.getloadavg()[0]]
    floor = _measure([sys.executable, "-c", "import torch, torchvision, prunekit.cli.main"], sources["after"],
                     args.timeout)
    print(json.dumps({"imports_only": floor}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, side in [(name, side) for name, side in CASES if name in args.models]:
            model, _ = _model_and_input(name, side)
            dense_dir = Path(tmp) / name.replace(":", "_")
            save_artifact(model, ModelSpec(model=name, num_classes=1000 if name.startswith("tv:") else 10,
                                           input_shape=(3, side, side)), dense_dir)
            for scope in SCOPES:
                row: dict = {"model": name, "input": f"3x{side}x{side}", "scope": scope}
                for when, src in sources.items():
                    search = [sys.executable, __file__, "--child", "search",
                              "--model", name, "--side", str(side), "--scope", scope]
                    prune = [sys.executable, "-m", "prunekit", "prune", str(dense_dir), "--target",
                             f"macs={TARGET}", "--scope", scope, "--out", str(Path(tmp) / f"out_{when}")]
                    row[f"search_{when}"] = _measure(search, src, args.timeout)
                    row[f"process_{when}"] = _measure(prune, src, args.timeout)
                for part in ("search", "process"):
                    before, after = row[f"{part}_before"], row[f"{part}_after"]
                    key = "cpu_seconds" if part == "search" else "cpu_s"
                    if key in before and key in after:
                        row[f"{part}_cpu_ratio"] = round(before[key] / after[key], 2)
                if args.phases:
                    row["phases_after"] = _measure([sys.executable, __file__, "--child", "phases", "--model", name,
                                                    "--side", str(side), "--scope", scope], sources["after"],
                                                   args.timeout)
                print(json.dumps(row), flush=True)
                rows.append(row)
    load.append(os.getloadavg()[0])
    write_json(args.out, {"rows": rows, "imports_only": floor, "load_average_1min": load,
                          "target": f"macs={TARGET}", "machine": machine_info(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                          "commits": {when: _commit(src) for when, src in sources.items()}})


def _commit(src: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
