"""Comparison tables: runs of the same recipe (same digest) become one row, mean ± std over seeds.

Selections name runs or groups by id (``GROUP/sSEED``, ``GROUP``) or by directory, or filter the
store's columns (``method=oneshot``). Only finished runs (``done``) enter a comparison; failed and
running ones are counted in :attr:`Comparison.skipped`. Tables are written as Markdown and CSV,
each atomically.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prunekit.errors import UserError
from prunekit.experiment.store import ResultsStore
from prunekit.io import atomic_open

DEFAULT_STORE = Path("runs") / "results.sqlite"

METRICS = ("final_test_acc", "best_test_acc", "dense_test_acc", "sparsity", "macs", "params", "wall_time_s")


@dataclass
class Selection:
    store: ResultsStore
    run_ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)


def _recorded_store(directory: Path) -> Path | None:
    for name in ("run.json", "group.json"):
        path = directory / name
        if path.is_file():
            return (directory / json.loads(path.read_text())["store"]).resolve()
    return None


def find_store(refs: Sequence[str], explicit: str | Path | None) -> ResultsStore:
    """``explicit``, else the store a referenced run/group directory names, else runs/results.sqlite."""
    if explicit is not None:
        path = Path(explicit)
    else:
        recorded = [p for ref in refs if Path(ref).is_dir() and (p := _recorded_store(Path(ref))) is not None]
        path = recorded[0] if recorded else DEFAULT_STORE
    store = ResultsStore(path)
    if not store.exists():
        raise UserError(f"store: {str(path)!r} does not exist; run prunekit run first, or pass --store FILE")
    return store


def select(store: ResultsStore, refs: Sequence[str]) -> Selection:
    """Resolve run/group ids or directories against ``store``."""
    selection = Selection(store)
    known_groups = store.group_ids()
    for ref in refs:
        directory = Path(ref)
        if (directory / "run.json").is_file():
            selection.run_ids.append(json.loads((directory / "run.json").read_text())["run_id"])
        elif (directory / "group.json").is_file():
            selection.groups.append(json.loads((directory / "group.json").read_text())["group"])
        elif ref in known_groups:
            selection.groups.append(ref)
        elif store.get(ref) is not None:
            selection.run_ids.append(ref)
        else:
            raise UserError(f"run: no run or group {ref!r} in {str(store.path)!r} (and no run directory there)")
    return selection


def selected_rows(selection: Selection) -> list[dict[str, Any]]:
    rows = {r["run_id"]: r for r in selection.store.rows(run_ids=selection.run_ids)} if selection.run_ids else {}
    if selection.groups:
        rows.update({r["run_id"]: r for r in selection.store.rows(groups=selection.groups)})
    return sorted(rows.values(), key=lambda r: (r["created_at"], r["run_id"]))


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        present = [float(v) for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        return cls(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))


@dataclass
class Row:
    """One recipe (digest): its identity and each metric over its finished runs."""

    name: str
    recipe_hash: str
    method: str
    model: str
    data: str
    target: str | None
    granularity: str | None
    runs: list[str]
    seeds: list[int]
    stats: dict[str, Stat]
    dense_macs: float | None
    dense_params: float | None


@dataclass
class Comparison:
    rows: list[Row]
    skipped: dict[str, str]
    """run id -> status, for selected runs that are not done."""


def compare(rows: Sequence[dict[str, Any]]) -> Comparison:
    """One :class:`Row` per recipe digest, in order of first appearance."""
    skipped = {r["run_id"]: r["status"] for r in rows if r["status"] != "done"}
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done":
            by_hash.setdefault(row["recipe_hash"], []).append(row)
    out = []
    for digest, runs in by_hash.items():
        first = runs[0]
        out.append(Row(first["name"], digest, first["method"], first["model"], first["data"], first["target"],
                       first["granularity"], [r["run_id"] for r in runs], sorted({r["seed"] for r in runs}),
                       {m: Stat.of([r[m] for r in runs]) for m in METRICS},
                       Stat.of([r["dense_macs"] for r in runs]).mean, Stat.of([r["dense_params"] for r in runs]).mean))
    return Comparison(out, skipped)


# ------------------------------------------------------------------------ rendering
HEADERS = ("experiment", "method", "model", "data", "target", "runs", "final acc %", "best acc % (optimistic)",
           "dense acc %", "sparsity % (conv)", "MACs", "params", "wall s")


def _pm(stat: Stat, scale: float = 100.0, digits: int = 2) -> str:
    if stat.mean is None:
        return "-"
    text = f"{scale * stat.mean:.{digits}f}"
    return f"{text} ± {scale * stat.std:.{digits}f}" if stat.std is not None else text


def _count(stat: Stat, dense: float | None) -> str:
    if stat.mean is None:
        return "-"
    ratio = f" ({stat.mean / dense:.2f}x)" if dense else ""
    return f"{stat.mean:,.0f}{ratio}"


def cells(row: Row) -> list[str]:
    s = row.stats
    return [f"{row.name} ({row.recipe_hash[:8]})", row.method, row.model, row.data, row.target or "-",
            str(len(row.runs)), _pm(s["final_test_acc"]), _pm(s["best_test_acc"]), _pm(s["dense_test_acc"]),
            _pm(s["sparsity"]), _count(s["macs"], row.dense_macs), _count(s["params"], row.dense_params),
            _pm(s["wall_time_s"], scale=1.0, digits=0)]


def to_markdown(comparison: Comparison) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    out = [line(HEADERS), line(["---"] * 5 + ["---:"] * (len(HEADERS) - 5))]
    out += [line(cells(row)) for row in comparison.rows]
    text = "\n".join(out) + "\n"
    text += ("\nmean ± sample std over runs of the same recipe; final = last epoch, test split; "
             "sparsity = conv weights removed or zero vs the dense model; MACs thop convention.\n")
    if comparison.skipped:
        text += "\nnot compared (not done): " + ", ".join(f"{k} ({v})" for k, v in comparison.skipped.items()) + "\n"
    return text


def to_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "recipe_hash", "method", "model", "data", "target", "granularity", "runs", "seeds",
                     *[f"{m}_{k}" for m in METRICS for k in ("mean", "std")], "dense_macs", "dense_params"])
    for row in comparison.rows:
        writer.writerow([row.name, row.recipe_hash, row.method, row.model, row.data, row.target or "",
                         row.granularity or "", len(row.runs), " ".join(map(str, row.seeds)),
                         *[_num(getattr(row.stats[m], k)) for m in METRICS for k in ("mean", "std")],
                         _num(row.dense_macs), _num(row.dense_params)])
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_tables(comparison: Comparison, markdown: Path, csv_path: Path) -> None:
    with atomic_open(markdown) as handle:
        handle.write(to_markdown(comparison))
    with atomic_open(csv_path) as handle:
        handle.write(to_csv(comparison))
