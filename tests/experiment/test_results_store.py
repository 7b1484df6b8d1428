"""The SQLite results store under concurrent writers and writers killed mid-write."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from prunekit.errors import UserError
from prunekit.experiment.store import RESULT_COLUMNS, ResultsStore, parse_filters

# fork: the children only touch sqlite; spawning would re-import torch for each (seconds on 2 cores)
CTX = multiprocessing.get_context("fork")
RUNS_PER_WRITER = 40


def base_row(run_id: str, seed: int = 0) -> dict:
    return {"run_id": run_id, "group_id": run_id.split("/")[0], "recipe_hash": "h" * 64, "name": "t", "seed": seed,
            "method": "oneshot", "model": "small_cnn", "data": "digits", "target": "weights=0.5",
            "granularity": "weight", "git_commit": "unknown", "run_dir": run_id}


def results(i: int) -> dict:
    return {"sparsity": 0.5, "sparsity_covers": "conv", "macs": 1000 + i, "dense_macs": 2000, "params": 10 + i,
            "dense_params": 20, "final_test_acc": i / 1000, "best_test_acc": i / 1000, "dense_test_acc": 0.9,
            "latency_ms": None, "wall_time_s": float(i)}


def writer(path: str, name: str, barrier) -> None:
    """Start and finish runs in lockstep with the other writer, so both finish at the same moment."""
    store = ResultsStore(path, timeout_s=30)
    for i in range(RUNS_PER_WRITER):
        run_id = f"{name}/s{i}"
        store.start(base_row(run_id, i))
        barrier.wait(timeout=30)
        store.finish(run_id, results(i))
    os._exit(0)


def test_two_processes_finishing_runs_at_once(tmp_path):
    path = str(tmp_path / "results.sqlite")
    barrier = CTX.Barrier(2)
    procs = [CTX.Process(target=writer, args=(path, name, barrier)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = ResultsStore(path)
    assert store.integrity() == "ok"
    rows = store.rows()
    assert len(rows) == 2 * RUNS_PER_WRITER
    for row in rows:
        i = int(row["run_id"].split("/s")[1])
        assert row["status"] == "done" and row["finished_at"] is not None
        assert {k: row[k] for k in RESULT_COLUMNS} == results(i)
    assert len(store.rows({"group_id": ["a"]})) == RUNS_PER_WRITER


def hold_a_write(path: str, ready: str) -> None:
    """Open a write transaction, write a row into it, then wait to be killed before committing."""
    store = ResultsStore(path)
    with store.transaction() as conn:
        conn.execute("UPDATE runs SET status = 'done', final_test_acc = 0.99 WHERE run_id = 'kept/s0'")
        conn.execute("INSERT INTO runs (run_id, group_id, recipe_hash, name, seed, model, data, status, git_commit, "
                     "run_dir, created_at) "
                     "VALUES ('ghost/s0', 'ghost', 'h', 't', 0, 'm', 'd', 'done', 'x', 'g', 'now')")
        Path(ready).touch()
        time.sleep(600)
    os._exit(0)


def test_writer_killed_inside_a_transaction_leaves_the_last_commit(tmp_path):
    path = str(tmp_path / "results.sqlite")
    store = ResultsStore(path, timeout_s=10)
    store.start(base_row("kept/s0"))
    ready = tmp_path / "ready"
    child = CTX.Process(target=hold_a_write, args=(path, str(ready)))
    child.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.exists()
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    assert store.integrity() == "ok"
    assert store.get("ghost/s0") is None, "an uncommitted insert must vanish"
    row = store.get("kept/s0")
    assert row["status"] == "running" and row["final_test_acc"] is None
    began = time.monotonic()
    store.finish("kept/s0", results(7))  # the killed writer's lock is gone
    assert time.monotonic() - began < 5
    assert store.get("kept/s0")["final_test_acc"] == results(7)["final_test_acc"]


def burst(path: str) -> None:
    store = ResultsStore(path, timeout_s=30)
    for i in range(100_000):
        store.start(base_row(f"burst/s{i}", i))
        store.finish(f"burst/s{i}", results(i))


def test_writer_killed_at_a_random_moment_keeps_every_row_whole(tmp_path):
    path = str(tmp_path / "results.sqlite")
    child = CTX.Process(target=burst, args=(path,))
    child.start()
    store = ResultsStore(path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(store.rows()) < 15:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert store.integrity() == "ok"
    rows = store.rows()
    assert len(rows) >= 15
    for row in rows:
        i = int(row["run_id"].split("/s")[1])
        if row["status"] == "done":
            assert {k: row[k] for k in RESULT_COLUMNS} == results(i)
        else:  # started, not finished: no result at all
            assert row["status"] == "running" and all(row[k] is None for k in RESULT_COLUMNS)
    assert sum(r["status"] == "running" for r in rows) <= 1
    store.start(base_row("after/s0"))  # still writable
    assert store.get("after/s0")["status"] == "running"


def test_failed_run_keeps_its_error_and_no_result(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    store.start(base_row("x/s0"))
    store.finish("x/s0", results(3))
    store.start(base_row("x/s0"))  # a resumed run starts again: its old result is cleared
    assert store.get("x/s0")["final_test_acc"] is None
    store.fail("x/s0", "RuntimeError: boom")
    row = store.get("x/s0")
    assert row["status"] == "failed" and row["error"] == "RuntimeError: boom"
    assert all(row[k] is None for k in RESULT_COLUMNS)


def test_filters_are_typed_and_checked(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    for i in range(3):
        store.start(base_row(f"g/s{i}", i))
        store.finish(f"g/s{i}", results(i))
    assert [r["seed"] for r in store.rows(parse_filters(["seed=1"]))] == [1]
    assert len(store.rows(parse_filters(["seed=0", "seed=2", "status=done"]))) == 2
    assert len(store.rows(parse_filters(["sparsity=0.5"]))) == 3
    with pytest.raises(UserError, match="unknown key 'colour'"):
        parse_filters(["colour=red"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_filters(["seed"])
    with pytest.raises(UserError, match="seed is a number"):
        store.rows(parse_filters(["seed=zero"]))


def _tree(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes()) for p in root.rglob("*"))


def _every_access(store: ResultsStore) -> dict:
    return {"ensure": store.ensure, "start": lambda: store.start(base_row("g/s0")), "rows": store.rows,
            "group_ids": store.group_ids, "integrity": store.integrity}


@pytest.mark.parametrize("content", [b"hello, not a database\n", b"SQLite format 3\x00" + bytes(200), os.urandom(5000)],
                         ids=["text", "header-only", "random"])
def test_a_file_that_is_not_sqlite_is_one_line_naming_it(content, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    before = _tree(tmp_path)
    for name, access in _every_access(ResultsStore(path)).items():
        with pytest.raises(UserError) as err:
            access()
        assert str(err.value).startswith(f"store '{path}' cannot be used: "), name
        assert "\n" not in str(err.value), name
    assert _tree(tmp_path) == before  # no -wal/-shm sidecar, the file untouched


def test_a_store_under_a_file_is_one_line_and_creates_nothing(tmp_path):
    """Tests run as root, for whom read-only folders are writable: a parent that is a regular
    file makes the path unwritable for everyone."""
    (tmp_path / "file").write_text("keep")
    before = _tree(tmp_path)
    for relative in ("file/results.sqlite", "file/sub/results.sqlite"):
        path = tmp_path / relative
        for name, access in _every_access(ResultsStore(path)).items():
            if name in ("rows", "group_ids"):  # a store that does not exist reads as empty
                assert access() in ([], set()), name
                continue
            with pytest.raises(UserError) as err:
                access()
            assert str(err.value) == f"store: cannot create '{path}': '{tmp_path / 'file'}' is a file, not a folder"
    assert _tree(tmp_path) == before


def test_a_path_sqlite_cannot_open_is_one_line(tmp_path):
    """/sys accepts no new file, not even from root (the read-only folder of this test)."""
    (tmp_path / "a-directory").mkdir()
    for path in (Path("/sys/prunekit-test.sqlite"), tmp_path / "a-directory"):
        with pytest.raises(UserError, match=f"^store '{path}' cannot be used: unable to open database file "):
            ResultsStore(path).start(base_row("g/s0"))
    assert not Path("/sys/prunekit-test.sqlite").exists() and _tree(tmp_path) == [("a-directory", True)]


def test_ensure_creates_an_empty_store_and_bugs_stay_bugs(tmp_path):
    store = ResultsStore(tmp_path / "new" / "results.sqlite")
    store.ensure()
    assert store.exists() and store.rows() == [] and store.integrity() == "ok"
    row = base_row("g/s0")
    del row["model"]  # a NOT NULL column: prunekit's mistake, not the user's, so no UserError
    with pytest.raises(sqlite3.IntegrityError):
        store.start(row)
