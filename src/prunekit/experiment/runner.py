"""The experiment runner: a validated recipe → one run directory per seed + a row in the store.

Layout under ``out`` (default ``runs/``)::

    runs/results.sqlite                 the results store (one row per run)
    runs/NAME-HASH8/                    a group: one recipe, several seeds
      group.json  recipe.yaml           (recipe.yaml: resolved, every seed)
      s0/  s1/ ...                      one run per seed, see prunekit.experiment.stages

``HASH8`` starts the recipe's digest (what determines the results), so the directory says which
experiment it holds; running the same recipe again makes a replicate ``NAME-HASH8-2``. The
run id is ``GROUP/sSEED``. :func:`resume` continues a run or a whole group after a crash or a
kill: finished stages are skipped and a training stage resumes from its last checkpoint.

Under torchrun every rank runs the recipe (see :mod:`prunekit.experiment.stages`); rank 0 names
the group, holds the run's lock and alone writes files, store rows and logger output. The
launch's training options (``scale_lr``, ``sync_batchnorm``) and world size are kept in
run.json, and a resume with others is refused.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.distributed import current
from prunekit.errors import UserError
from prunekit.experiment.loggers import build_loggers, flatten
from prunekit.experiment.recipe import Recipe, load_recipe
from prunekit.experiment.stages import (Events, HooksFor, StageContext, read_json, recipe_data, result_row,
                                       run_stages)
from prunekit.experiment.store import ResultsStore, now
from prunekit.io import atomic_open, make_dirs, unwritable, write_json

log = logging.getLogger(__name__)

STORE_NAME = "results.sqlite"
GROUP_FILE = "group.json"
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    group: str
    seed: int
    run_dir: Path
    store: ResultsStore


@functools.lru_cache(maxsize=1)
def prunekit_commit() -> str:
    """The git commit of the prunekit source in use (``-dirty`` with local changes), else ``unknown``."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # the package is tracked in this repository
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def _write_recipe(path: Path, recipe: Recipe, note: str) -> None:
    with atomic_open(path) as handle:
        handle.write(f"# {note}\n# Fully resolved (defaults filled in). `prunekit run <this file>` runs it again "
                     "as a new\n# group; `prunekit run --resume <its directory>` continues this one.\n")
        handle.write(recipe.to_yaml())


def _group_name(recipe: Recipe, out: Path, store: ResultsStore) -> str:
    base = f"{recipe.name}-{recipe.digest()[:8]}"
    taken = store.group_ids()
    name, n = base, 1
    while (out / name).exists() or name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def run_recipe(recipe: Recipe, out: str | Path = "runs", *, store: str | Path | None = None,
               hooks_for: HooksFor | None = None, events: Events | None = None,
               source: str = "recipe", launch: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every seed of ``recipe`` under a new group in ``out``; the result rows, in seed order.

    ``launch``: TrainConfig fields set for every training of the run (``scale_lr``, ``sync_batchnorm``;
    unset ones take their defaults, and on resume the values the run was started with).
    """
    out = Path(out)
    recipe_data(recipe)  # a damaged data file fails here, before a group or a store row exists (decoded once: cached)
    store = ResultsStore(store if store is not None else out / STORE_NAME)
    ranks = current()
    group = None
    if ranks.is_main:
        store.ensure()  # a store that cannot be used fails before anything is written
        group = _group_name(recipe, out, store)
        try:
            (out / group).mkdir(parents=True)
        except OSError as exc:
            raise unwritable(out / group, exc) from None
    group = ranks.broadcast(group)
    group_dir = out / group
    _write_recipe(group_dir / RECIPE_FILE, recipe, f"prunekit recipe {recipe.name} (from {Path(source).name})")
    write_json(group_dir / GROUP_FILE, {"group": group, "recipe_hash": recipe.digest(), "seeds": recipe.seeds,
                                        "store": _relative(store.path, group_dir), "created_at": now()})
    log.info("group %s: %d seed(s) in %s", group, len(recipe.seeds), group_dir)
    return [_start_and_run(recipe, group_dir, group, seed, store, hooks_for, events, launch)
            for seed in recipe.seeds]


def launch_record(launch: dict[str, Any] | None) -> dict[str, Any]:
    """What run.json keeps of the launch: world size and the training options it set."""
    return {"world_size": current().world_size, "scale_lr": "none", "sync_batchnorm": False, **(launch or {})}


def _start_and_run(recipe: Recipe, group_dir: Path, group: str, seed: int, store: ResultsStore,
                   hooks_for: HooksFor | None, events: Events | None,
                   launch: dict[str, Any] | None) -> dict[str, Any]:
    run_dir = group_dir / f"s{seed}"
    single = recipe.with_seed(seed)
    make_dirs(run_dir)
    _write_recipe(run_dir / RECIPE_FILE, single, f"prunekit run {group}/s{seed}")
    write_json(run_dir / RUN_FILE, {"run_id": f"{group}/s{seed}", "group": group, "seed": seed,
                                    "recipe_hash": recipe.digest(), "store": _relative(store.path, run_dir),
                                    "created_at": now(), "git_commit": prunekit_commit(),
                                    "launch": launch_record(launch)})
    current().barrier()  # the other ranks read run.json
    return run_one(run_dir, hooks_for=hooks_for, events=events, launch=launch)


def run_one(run_dir: Path, *, hooks_for: HooksFor | None = None, events: Events | None = None,
            store: str | Path | None = None, launch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) the run in ``run_dir``; its row goes to the store named in run.json."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_FILE)
    if info is None:
        raise UserError(f"--resume: {str(run_dir)!r} has no {RUN_FILE}; expected a run directory")
    recorded = info.get("launch", launch_record(None) | {"world_size": 1})
    wanted = {**recorded, **(launch or {}), "world_size": current().world_size}  # unset options: as recorded
    if wanted != recorded:
        raise UserError(f"--resume: {str(run_dir)!r} was started with {_launch_text(recorded)}, this launch has "
                        f"{_launch_text(wanted)}; resume it the way it was started")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if recipe.digest() != info["recipe_hash"]:
        raise UserError(f"--resume: {str(run_dir / RECIPE_FILE)!r} no longer describes this run (its digest "
                        f"{recipe.digest()[:8]} differs from run.json's {info['recipe_hash'][:8]}); run the edited "
                        "recipe as a new group with prunekit run")
    with _exclusive(run_dir) if current().is_main else nullcontext():
        return _run_locked(run_dir, info, recipe, hooks_for, events, store, recorded)


def _launch_text(launch: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(launch.items()))


@contextmanager
def _exclusive(run_dir: Path):
    """Hold ``RUN_DIR/.lock`` while running: a second process on the same run is refused (the OS
    drops the lock when its holder dies, so a killed run can be resumed at once)."""
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--resume: {str(run_dir)!r} is being run by another process right now") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(run_dir: Path, info: dict[str, Any], recipe: Recipe, hooks_for: HooksFor | None,
                events: Events | None, store: str | Path | None, launch: dict[str, Any]) -> dict[str, Any]:
    main = current().is_main
    results = ResultsStore(store if store is not None else run_dir / info["store"])
    run = RunInfo(info["run_id"], info["group"], info["seed"], run_dir, results)
    prune = recipe.prune
    described = prune.describe() if prune else {"target": None, "granularity": None}
    if main:
        results.start({"run_id": run.run_id, "group_id": run.group, "recipe_hash": info["recipe_hash"],
                       "name": recipe.name, "seed": run.seed, "method": prune.method if prune else "dense",
                       "model": recipe.model.name, "data": recipe.data.name, "target": described["target"],
                       "granularity": described["granularity"], "git_commit": info["git_commit"],
                       "run_dir": _relative(run_dir, results.path.parent), "created_at": info["created_at"]})
    emit = events or (lambda stage, event, data: None)
    emit("run", "start", {"run_id": run.run_id, "run_dir": str(run_dir)})
    loggers = build_loggers(recipe.loggers, run_dir, experiment=recipe.name, run_name=run.run_id) if main else []
    try:
        for logger in loggers:
            logger.log_params(flatten(recipe.resolved()))
        training = {key: launch[key] for key in ("scale_lr", "sync_batchnorm")}
        ctx = StageContext(recipe, run_dir, loggers=loggers, hooks_for=hooks_for, events=emit, launch=training)
        markers = run_stages(ctx)
        row = result_row(markers)
        write_json(run_dir / RESULT_FILE, {"run_id": run.run_id, "group": run.group, "seed": run.seed,
                                           "recipe_hash": info["recipe_hash"], "status": "done", **row})
        if main:
            results.finish(run.run_id, row)
    except BaseException as exc:
        if main:
            results.fail(run.run_id, describe(exc))
        write_json(run_dir / RESULT_FILE, {"run_id": run.run_id, "status": "failed", "error": describe(exc)})
        raise
    finally:
        for logger in loggers:
            logger.close()
    emit("run", "done", {"run_id": run.run_id, "run_dir": str(run_dir), **row})
    return {"run_id": run.run_id, "run_dir": str(run_dir), **row}


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt); continue with prunekit run --resume RUN_DIR"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resume(path: str | Path, *, hooks_for: HooksFor | None = None, events: Events | None = None,
           launch: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Continue a run directory, or every run of a group directory (starting seeds never started)."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return [run_one(path, hooks_for=hooks_for, events=events, launch=launch)]
    group = read_json(path / GROUP_FILE)
    if group is None:
        raise UserError(f"--resume: {str(path)!r} is neither a run directory ({RUN_FILE}) nor a group "
                        f"directory ({GROUP_FILE})")
    recipe = load_recipe(path / RECIPE_FILE)
    store = ResultsStore(path / group["store"])
    rows = []
    for seed in group["seeds"]:
        run_dir = path / f"s{seed}"
        if current().broadcast((run_dir / RUN_FILE).is_file()):
            rows.append(run_one(run_dir, hooks_for=hooks_for, events=events, launch=launch))
        else:
            rows.append(_start_and_run(recipe, path, group["group"], seed, store, hooks_for, events, launch))
    return rows
