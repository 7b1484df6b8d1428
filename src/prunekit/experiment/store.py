"""The results store: one SQLite file, one row per run, safe under concurrent and killed writers.

The file (default ``runs/results.sqlite``, next to the runs) uses WAL journaling and a busy
timeout, and every change is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``): two processes
finishing runs at once wait for each other instead of failing, and a process killed in the
middle of a write leaves the last committed state (SQLite rolls the partial transaction back).

A row starts as ``running`` when a run starts, and ends as ``done`` with its results or as
``failed`` with the error text (and no results). Run directories are stored relative to the
store's folder, so the store never holds a machine's absolute paths.

A path that is not an SQLite file, or whose folder cannot be made or written, is a one-line
:class:`UserError` naming it.

This module imports only the standard library (and prunekit's stdlib-only helpers), so tools
can read the store without torch.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prunekit.errors import UserError
from prunekit.io import unwritable

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed")

COLUMNS: dict[str, str] = {
    "run_id": "TEXT PRIMARY KEY",
    "group_id": "TEXT NOT NULL",
    "recipe_hash": "TEXT NOT NULL",
    "name": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "method": "TEXT",
    "model": "TEXT NOT NULL",
    "data": "TEXT NOT NULL",
    "target": "TEXT",
    "granularity": "TEXT",
    "sparsity": "REAL",
    "sparsity_covers": "TEXT",
    "macs": "INTEGER",
    "dense_macs": "INTEGER",
    "params": "INTEGER",
    "dense_params": "INTEGER",
    "final_test_acc": "REAL",
    "best_test_acc": "REAL",
    "dense_test_acc": "REAL",
    "latency_ms": "REAL",
    "wall_time_s": "REAL",
    "status": "TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed'))",
    "error": "TEXT",
    "git_commit": "TEXT NOT NULL",
    "run_dir": "TEXT NOT NULL",
    "created_at": "TEXT NOT NULL",
    "finished_at": "TEXT",
    "host": "TEXT",
    "pid": "INTEGER",
}
RESULT_COLUMNS = ("sparsity", "sparsity_covers", "macs", "dense_macs", "params", "dense_params", "final_test_acc",
                  "best_test_acc", "dense_test_acc", "latency_ms", "wall_time_s")
"""Filled only when a run is done; cleared when it fails or restarts."""
NUMERIC = {name for name, kind in COLUMNS.items() if kind.startswith(("INTEGER", "REAL"))}
_UNUSABLE = ("not a database", "unable to open", "readonly database", "disk I/O error", "malformed",
             "disk is full")
"""SQLite errors that say the file or its folder is unusable, rather than that a query is wrong."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """Rows of runs in the SQLite file ``path`` (created on the first write)."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s

    # ------------------------------------------------------------- connection
    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise unwritable(self.path, err, "store: cannot create") from err
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
                self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
                conn.execute("PRAGMA synchronous = FULL")
                self._ensure_schema(conn)
                yield conn
            finally:
                conn.close()
        except sqlite3.DatabaseError as err:
            if not any(text in str(err) for text in _UNUSABLE):
                raise
            raise UserError(f"store '{self.path}' cannot be used: {err} (a store is an SQLite file "
                            "that prunekit creates; its folder must be writable)") from err

    def _retry(self, action):
        """Run ``action``, retrying while another process holds a lock beyond the busy timeout's reach
        (switching to WAL cannot wait on the busy handler)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version not in (0, SCHEMA_VERSION):
                raise UserError(f"store: {str(self.path)!r} has schema version {version}; this prunekit "
                                f"reads version {SCHEMA_VERSION}")
            columns = ",\n  ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
            conn.execute(f"CREATE TABLE IF NOT EXISTS runs (\n  {columns}\n)")
            conn.execute("CREATE INDEX IF NOT EXISTS runs_group ON runs (group_id)")
            conn.execute("CREATE INDEX IF NOT EXISTS runs_hash ON runs (recipe_hash)")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside is committed together or not at all."""
        with self.connect() as conn, self._transaction(conn):
            yield conn

    # ------------------------------------------------------------------ writes
    def ensure(self) -> None:
        """Create the store (file and table) if absent, so an unusable path fails before a run starts."""
        with self.connect():
            pass

    def start(self, row: dict[str, Any]) -> None:
        """Insert a run as ``running`` (or reset an existing row of the same id for a resumed run)."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown store columns: {', '.join(sorted(unknown))}")
        values = {**row, "status": "running", "error": None, "finished_at": None,
                  "host": socket.gethostname(), "pid": os.getpid(), **dict.fromkeys(RESULT_COLUMNS)}
        values.setdefault("created_at", now())
        names = list(values)
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in ("run_id", "created_at"))
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                         f"ON CONFLICT (run_id) DO UPDATE SET {updates}", [values[n] for n in names])

    def finish(self, run_id: str, results: dict[str, Any]) -> None:
        """Mark a run ``done`` with its results, in one statement."""
        unknown = set(results) - set(RESULT_COLUMNS)
        if unknown:
            raise ValueError(f"not result columns: {', '.join(sorted(unknown))}")
        values = {**dict.fromkeys(RESULT_COLUMNS), **results}
        sets = ", ".join(f"{n} = ?" for n in values)
        with self.transaction() as conn:
            changed = conn.execute(f"UPDATE runs SET {sets}, status = 'done', error = NULL, finished_at = ? "
                                   "WHERE run_id = ?", [*values.values(), now(), run_id]).rowcount
        if not changed:
            raise KeyError(f"no run {run_id!r} in {self.path}")

    def fail(self, run_id: str, error: str) -> None:
        """Mark a run ``failed`` with its error; no result is kept."""
        clear = ", ".join(f"{n} = NULL" for n in RESULT_COLUMNS)
        with self.transaction() as conn:
            conn.execute(f"UPDATE runs SET status = 'failed', error = ?, finished_at = ?, {clear} WHERE run_id = ?",
                         [error, now(), run_id])

    # ------------------------------------------------------------------- reads
    def exists(self) -> bool:
        return self.path.is_file()

    def rows(self, filters: dict[str, list[Any]] | None = None, *, run_ids: list[str] | None = None,
             groups: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows matching every filter (a key with several values matches any of them), oldest first."""
        if not self.exists():
            return []
        clauses, args = [], []
        for key, values in (filters or {}).items():
            if key not in COLUMNS:
                raise UserError(f"filter: unknown key {key!r}; known: {', '.join(COLUMNS)}")
            clauses.append(f"({' OR '.join(f'{key} IS ?' for _ in values)})")
            args += [_typed(key, v) for v in values]
        for column, wanted in (("run_id", run_ids), ("group_id", groups)):
            if wanted is not None:
                clauses.append(f"{column} IN ({', '.join('?' * len(wanted))})" if wanted else "0")
                args += wanted
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(f"SELECT * FROM runs {where} ORDER BY created_at, run_id", args)]

    def get(self, run_id: str) -> dict[str, Any] | None:
        found = self.rows(run_ids=[run_id])
        return found[0] if found else None

    def group_ids(self) -> set[str]:
        if not self.exists():
            return set()
        with self.connect() as conn:
            return {r[0] for r in conn.execute("SELECT DISTINCT group_id FROM runs")}

    def integrity(self) -> str:
        with self.connect() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]


def _typed(key: str, value: Any) -> Any:
    """Filter values arrive as text; compare numbers as numbers and 'null' as NULL."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("null", "none"):
        return None
    if key in NUMERIC:
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"filter: {key} is a number, got {value!r}") from None
        return int(number) if number.is_integer() and COLUMNS[key].startswith("INTEGER") else number
    return value


def parse_filters(items: list[str], option: str = "--filter") -> dict[str, list[str]]:
    """``["method=oneshot", "seed=0", "method=gradual"]`` -> {"method": [...], "seed": ["0"]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{option}: expected KEY=VALUE such as method=oneshot, got {item!r}")
        if key not in COLUMNS:
            raise UserError(f"{option}: unknown key {key!r}; known: {', '.join(COLUMNS)}")
        out.setdefault(key, []).append(value.strip())
    return out


def process_alive(row: dict[str, Any]) -> bool | None:
    """Whether the process of a ``running`` row still runs (None: it ran on another host)."""
    if row.get("host") != socket.gethostname() or not row.get("pid"):
        return None
    try:
        os.kill(int(row["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dumps(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
