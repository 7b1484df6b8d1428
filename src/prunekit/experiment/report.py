"""Reports of a run or a group of runs: PNG plots (matplotlib, Agg canvas) and a short Markdown page.

* ``accuracy_vs_sparsity.png``: final test accuracy against sparsity and against MACs, for every
  finished run in the store on the same model and data (mean ± std over seeds per recipe), the
  reported run(s) highlighted.
* ``training_curves.png``: loss and accuracy per epoch over all training stages (from the run's
  ``metrics.jsonl``), stage boundaries marked.
* ``schedules.png``: the LR plan (and momentum) and the target sparsity over the whole run, computed
  from the LR-plan and schedule objects the recipe describes (no training needed), with the
  sparsity each epoch actually reached where the run logged it.
* ``layers.png``: the fraction of each layer's weights kept in the final model.

Figures are drawn on their own ``Figure`` objects (no pyplot state) and written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from prunekit.errors import UserError
from prunekit.experiment.compare import cells, compare, HEADERS
from prunekit.experiment.recipe import Recipe, load_recipe
from prunekit.experiment.stages import MARKER, STAGE_DIRS
from prunekit.experiment.store import ResultsStore
from prunekit.io import atomic_open, atomic_path

log = logging.getLogger(__name__)

STAGE_LABELS = {"train": "dense training", "prune": "pruning", "retrain": "retraining"}
STAGE_COLORS = {"train": "#4c72b0", "prune": "#dd8452", "retrain": "#55a868"}
METHOD_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


@dataclass
class Subject:
    """What a report is about: one run, or the runs (seeds) of a group."""

    label: str
    run_dirs: list[Path]
    out_dir: Path
    store: ResultsStore | None

    @property
    def recipe(self) -> Recipe:
        return load_recipe(self.run_dirs[0] / "recipe.yaml")


def find_subject(ref: str | Path, store: str | Path | None = None, out: str | Path | None = None) -> Subject:
    """A run directory, a group directory, or a run/group id in ``store``."""
    path = Path(ref)
    if (path / "run.json").is_file():
        info = json.loads((path / "run.json").read_text())
        return Subject(info["run_id"], [path], Path(out or path / "report"), _store(path, info, store))
    if (path / "group.json").is_file():
        info = json.loads((path / "group.json").read_text())
        runs = [path / f"s{seed}" for seed in info["seeds"] if (path / f"s{seed}" / "run.json").is_file()]
        if not runs:
            raise UserError(f"report: group {str(path)!r} has no run yet")
        return Subject(info["group"], runs, Path(out or path / "report"), _store(path, info, store))
    if store is None:
        store = Path("runs") / "results.sqlite"
    results = ResultsStore(store)
    if not results.exists():
        raise UserError(f"report: {str(ref)!r} is not a run or group directory, and store {str(store)!r} "
                        "does not exist")
    rows = results.rows(run_ids=[str(ref)]) or results.rows(groups=[str(ref)])
    if not rows:
        raise UserError(f"report: no run directory, run id or group {str(ref)!r} (store {str(store)!r})")
    base = results.path.parent
    runs = [base / r["run_dir"] for r in rows]
    missing = [str(r) for r in runs if not (r / "run.json").is_file()]
    if missing:
        raise UserError(f"report: run directory {missing[0]!r} is gone")
    label = str(ref)
    default_out = runs[0] / "report" if len(runs) == 1 and rows[0]["run_id"] == label else runs[0].parent / "report"
    return Subject(label, runs, Path(out or default_out), results)


def _store(directory: Path, info: dict[str, Any], explicit: str | Path | None) -> ResultsStore | None:
    store = ResultsStore(explicit if explicit is not None else directory / info["store"])
    return store if store.exists() else None


def make_report(subject: Subject) -> list[Path]:
    """Write every plot that has data, plus ``report.md``; the files written."""
    subject.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("accuracy_vs_sparsity.png", plot_accuracy), ("training_curves.png", plot_training),
                       ("schedules.png", plot_schedules), ("layers.png", plot_layers)):
        path = subject.out_dir / name
        if draw(subject, path):
            written.append(path)
        else:
            log.info("no data for %s", name)
    written.append(_write_markdown(subject, written))
    return written


# ------------------------------------------------------------------------- helpers
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> bool:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _method_label(row: dict[str, Any]) -> str:
    if row["method"] in (None, "dense"):
        return "dense"
    return f"{row['method']}, {row['granularity']}"


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "run.json").read_text())["run_id"]


# ------------------------------------------------------------- accuracy vs sparsity
def plot_accuracy(subject: Subject, path: Path) -> bool:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    recipe = subject.recipe
    if subject.store is None:
        return False
    rows = subject.store.rows({"model": [recipe.model.name], "data": [recipe.data.name], "status": ["done"]})
    if not rows:
        return False
    mine = {_run_id(d) for d in subject.run_dirs}
    mine_hashes = {r["recipe_hash"] for r in rows if r["run_id"] in mine}
    comparison = compare(rows)
    labels = sorted({_method_label(r) for r in rows})
    markers = {label: METHOD_MARKERS[i % len(METHOD_MARKERS)] for i, label in enumerate(labels)}
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    first = {r["recipe_hash"]: r for r in reversed(rows)}

    fig = _figure(11.5, 4.6)
    ax_s, ax_m = fig.subplots(1, 2, sharey=True)
    dense_acc = [r["dense_test_acc"] for r in rows if r["run_id"] in mine and r["dense_test_acc"] is not None]
    max_macs = max([r["macs"] for r in rows if r["macs"]] + [r["dense_macs"] for r in rows if r["dense_macs"]])
    same_macs = len({r["macs"] for r in rows}) == 1
    seen: set[str] = set()
    for row in comparison.rows:
        label = _method_label(first[row.recipe_hash])
        acc, sparsity, macs = row.stats["final_test_acc"], row.stats["sparsity"], row.stats["macs"]
        if acc.mean is None:
            continue
        highlight = row.recipe_hash in mine_hashes
        style = dict(marker=markers[label], color=colors[label], ms=11 if highlight else 7, capsize=3, ls="none",
                     mec="black" if highlight else colors[label], mew=1.6 if highlight else 0.8, zorder=3,
                     label=label if label not in seen else None)
        seen.add(label)
        yerr = 100 * acc.std if acc.std is not None else None
        for ax, x, xerr, scale in ((ax_s, sparsity, sparsity.std, 100), (ax_m, macs, macs.std, 1e-6)):
            if x.mean is None:
                continue
            ax.errorbar(scale * x.mean, 100 * acc.mean, yerr=yerr, xerr=scale * xerr if xerr else None, **style)
            if ax is ax_m and not highlight and same_macs:
                continue  # all at the dense MACs: one label is enough
            text = f"{row.target or 'dense'}"
            if highlight:
                text += f"\n{100 * acc.mean:.2f}%" + (f" ± {100 * acc.std:.2f}" if acc.std is not None else "")
                text += f" (n={len(row.runs)})" if len(row.runs) > 1 else ""
            right = scale * x.mean > 0.75 * (100 if ax is ax_s else scale * max_macs)
            if highlight:  # above the point, clear of the others' labels below theirs
                ax.annotate(text, (scale * x.mean, 100 * acc.mean), textcoords="offset points", xytext=(0, 10),
                            ha="right" if right else "center", va="bottom", fontsize=8, fontweight="bold")
            else:
                ax.annotate(text, (scale * x.mean, 100 * acc.mean), textcoords="offset points",
                            xytext=(-9 if right else 9, -5), ha="right" if right else "left", va="top", fontsize=8)
    if dense_acc:
        mean = 100 * sum(dense_acc) / len(dense_acc)
        for ax in (ax_s, ax_m):
            ax.axhline(mean, color="grey", ls=":", lw=1.2, label=f"dense before pruning ({mean:.2f}%)")
    dense_macs = [r["dense_macs"] for r in rows if r["dense_macs"]]
    if dense_macs:
        ax_m.axvline(1e-6 * dense_macs[0], color="grey", ls="--", lw=1,
                     label=f"dense MACs ({dense_macs[0] / 1e6:.2f} M)")
    ax_s.set_xlabel("sparsity: conv weights removed or zero (vs dense)")
    ax_s.xaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax_s.set_xlim(-3, 103)
    ax_m.set_xlabel("MACs per image (millions, thop convention)")
    ax_m.set_xlim(left=0)
    ax_m.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_s.set_ylabel("final test accuracy (%)")
    for ax in (ax_s, ax_m):
        ax.grid(True, alpha=0.3)
        ax.margins(y=0.15)
    if same_macs:
        ax_m.text(0.03, 0.97, "every run has the same MACs: zeros left in place\n(unstructured pruning) are "
                  "still counted;\nfilter pruning with compact: true removes them", transform=ax_m.transAxes,
                  va="top", fontsize=8, color="dimgrey")
    ax_s.legend(loc="lower left", fontsize=8)
    ax_m.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{recipe.model.name} on {recipe.data.name}: final test accuracy, {len(comparison.rows)} recipe(s), "
                 f"{len(rows)} run(s); outlined = {subject.label}", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------ training curves
def _stage_spans(metrics: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    spans: list[tuple[str, float, float]] = []
    for row in metrics:
        stage, step = row["stage"], row["step"]
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], step)
        else:
            spans.append((stage, step - 1, step))
    return spans


def _shade(ax, spans: Sequence[tuple[str, float, float]], label_top: bool = True) -> None:
    for stage, start, end in spans:
        ax.axvspan(start, end, color=STAGE_COLORS.get(stage, "grey"), alpha=0.08, lw=0)
        if label_top:
            ax.text((start + end) / 2, 0.985, STAGE_LABELS.get(stage, stage), transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8, color=STAGE_COLORS.get(stage, "grey"),
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})


def plot_training(subject: Subject, path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    runs = [(d, _metrics(d)) for d in subject.run_dirs]
    runs = [(d, m) for d, m in runs if m]
    if not runs:
        return False
    fig = _figure(11.5, 4.4)
    ax_loss, ax_acc = fig.subplots(1, 2, sharex=True)
    spans = _stage_spans(runs[0][1])
    for ax in (ax_loss, ax_acc):
        _shade(ax, spans)
    alpha = 1.0 if len(runs) == 1 else 0.55
    curves = (("train_loss", "C0", "train"), ("test_loss", "C1", "test"), ("train_acc", "C0", "train"),
              ("test_acc", "C1", "test"))
    labelled: set[tuple[str, str]] = set()
    for run_dir, metrics in runs:
        for stage in dict.fromkeys(m["stage"] for m in metrics):  # one line per stage: no line across a prune
            rows = [m for m in metrics if m["stage"] == stage]
            for key, color, name in curves:
                points = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
                if not points:
                    continue
                ax = ax_acc if key.endswith("acc") else ax_loss
                scale = 100 if key.endswith("acc") else 1
                text = name if len(runs) == 1 else f"{name} (each seed)"
                ax.plot([p[0] for p in points], [scale * p[1] for p in points], marker="o", ms=3.5, lw=1.6,
                        color=color, alpha=alpha, label=text if (key, text) not in labelled else None)
                labelled.add((key, text))
    pruned_at = _oneshot_epoch(subject)
    after = [m.get("test_acc_after_prune") for m in (_read_json(d / STAGE_DIRS["prune"] / MARKER) or {}
                                                       for d, _ in runs)]
    after = [100 * a for a in after if a is not None]
    for ax in (ax_loss, ax_acc):
        if pruned_at is not None:
            ax.axvline(pruned_at, color="C3", lw=1.5, ls="--", label=f"pruned to {subject.recipe.prune.describe()['target']}")
        ax.set_xlabel("epoch (all training stages in order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    dense = [m.get("dense_test_acc") for m in (_read_json(d / STAGE_DIRS["train"] / MARKER) or {} for d, _ in runs)]
    dense = [100 * a for a in dense if a is not None]
    if pruned_at is not None and dense:
        ax_acc.plot([pruned_at] * len(dense), dense, "D", color="grey", ms=6, label="test, dense model")
    if pruned_at is not None and after:
        ax_acc.plot([pruned_at] * len(after), after, "X", color="C3", ms=9, label="test, right after pruning")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8, loc="best")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("accuracy (%)")
    label = subject.label if len(runs) == 1 else f"{subject.label} ({len(runs)} seeds)"
    fig.suptitle(f"training curves: {label}", fontsize=10)
    return _save(fig, path)


def _oneshot_epoch(subject: Subject) -> float | None:
    """The epoch (on the run's timeline) at which a non-training pruning method pruned."""
    recipe = subject.recipe
    if recipe.prune is None or recipe.prune.phase() is not None:
        return None
    return sum(spec.epochs for stage, spec in recipe.phases() if stage == "train")


# ---------------------------------------------------------------- LR and sparsity
def _steps_per_epoch(subject: Subject, stage: str) -> int:
    for run_dir in subject.run_dirs:
        marker = _read_json(run_dir / STAGE_DIRS[stage] / MARKER) or {}
        if marker.get("steps_per_epoch"):
            return int(marker["steps_per_epoch"])
    from prunekit.data import build_data

    d = subject.recipe.data
    data = build_data(d.name, data_dir=d.data_dir, batch_size=d.batch_size, subset=d.subset, download=False)
    return len(data.train)


def timeline(recipe: Recipe, steps_per_epoch: dict[str, int]) -> dict[str, list]:
    """LR, momentum and target sparsity per optimizer step over every training phase of ``recipe``.

    x is in epochs on the run's timeline (the step's end); sparsity holds the fraction of the
    target's unit removed. Computed from the LR plans and the sparsity schedule alone.
    """
    from prunekit.train.lr_plans import build_lr_plan

    prune = recipe.prune
    final = 0.0 if prune is None else prune.parsed_target.fraction if prune.target else math.nan
    schedule = prune.sparsity_schedule() if prune is not None else None
    level = schedule(0.0) if schedule is not None and recipe.phases()[0][0] == "prune" else 0.0
    if recipe.phases()[0][0] == "retrain":
        level = final
    xs, lrs, moms, sparsity, spans = [0.0], [math.nan], [None], [level], []
    offset = 0.0
    for stage, spec in recipe.phases():
        spe = steps_per_epoch[stage]
        plan = build_lr_plan(spec.lr_plan, lr=spec.lr, epochs=spec.epochs, steps_per_epoch=spe, **spec.lr_plan_args)
        schedule = prune.sparsity_schedule() if stage == "prune" else None
        if stage == "retrain" or (stage == "prune" and schedule is None):
            level = final
        total = spec.epochs * spe
        for step in range(total):
            xs.append(offset + (step + 1) / spe)
            lrs.append(plan.lr(step))
            momentum = plan.momentum(step)
            moms.append(momentum if momentum is not None else (spec.momentum if spec.optimizer == "sgd" else None))
            sparsity.append(schedule((step + 1) / total) if schedule is not None else level)
        if schedule is not None:
            level = final
        spans.append((stage, offset, offset + spec.epochs))
        offset += spec.epochs
    return {"x": xs, "lr": lrs, "momentum": moms, "sparsity": sparsity, "spans": spans}


def plot_schedules(subject: Subject, path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    recipe = subject.recipe
    phases = recipe.phases()
    if not phases:
        return False
    line = timeline(recipe, {stage: _steps_per_epoch(subject, stage) for stage, _ in phases})
    fig = _figure(11.5, 6.2)
    ax_lr, ax_sp = fig.subplots(2, 1, sharex=True)
    _shade(ax_lr, line["spans"])
    _shade(ax_sp, line["spans"], label_top=False)
    ax_lr.plot(line["x"], line["lr"], color="C0", lw=1.8, label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.grid(True, alpha=0.3)
    handles = ax_lr.get_legend_handles_labels()
    if any(m is not None for m in line["momentum"]):
        ax_mom = ax_lr.twinx()
        ax_mom.plot(line["x"], [m if m is not None else math.nan for m in line["momentum"]], color="C7", lw=1.2,
                    ls="--", label="momentum (SGD) / beta1 (Adam)")
        ax_mom.set_ylabel("momentum", color="C7")
        ax_mom.tick_params(axis="y", colors="C7")
        extra = ax_mom.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    legend = list(zip(*handles))
    plans = ", ".join(f"{STAGE_LABELS[stage]}: {spec.lr_plan} (peak {spec.lr:g}, {spec.epochs} ep)"
                      for stage, spec in phases)
    ax_lr.set_title(f"LR plans - {plans}", fontsize=9)

    prune = recipe.prune
    if prune is not None:
        unit = prune.parsed_target.unit if prune.target else "filters"
        ax_sp.plot(line["x"], line["sparsity"], color="C3", lw=2, drawstyle="steps-pre",
                   label=f"target: fraction of {unit} removed")
        realised = _realised(subject)
        if realised:
            ax_sp.plot([p[0] for p in realised], [p[1] for p in realised], "o", color="black", ms=4,
                       label="reached at epoch end (weights of the pruned layers)")
        schedule = prune.sparsity_schedule()
        what = schedule.describe() if schedule is not None else f"one-shot to {prune.describe()['target']} after dense training"
        ax_sp.set_title(f"sparsity - {prune.method}: {what}", fontsize=9)
        legend += list(zip(*ax_sp.get_legend_handles_labels()))
    else:
        ax_sp.plot(line["x"], line["sparsity"], color="C3", lw=2)
        ax_sp.set_title("sparsity - no pruning (dense baseline)", fontsize=9)
    ax_sp.set_ylim(-0.03, 1.03)
    ax_sp.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax_sp.set_ylabel("sparsity")
    ax_sp.set_xlabel("epoch (all training stages in order)")
    ax_sp.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_sp.set_xlim(0, line["spans"][-1][2])
    ax_sp.grid(True, alpha=0.3)
    fig.legend([h for h, _ in legend], [text for _, text in legend], loc="outside lower center",
               ncols=len(legend), fontsize=8)
    fig.suptitle(f"LR plan and sparsity schedule: {subject.label}", fontsize=10)
    return _save(fig, path)


def _realised(subject: Subject) -> list[tuple[float, float]]:
    metrics = _metrics(subject.run_dirs[0])
    return [(m["step"], m["sparsity_realised"]) for m in metrics if m.get("sparsity_realised") is not None]


# ---------------------------------------------------------------------- per layer
def plot_layers(subject: Subject, path: Path) -> bool:
    from matplotlib.ticker import PercentFormatter

    run_dir = subject.run_dirs[0]
    layers = _read_json(run_dir / STAGE_DIRS["evaluate"] / "layers.json")
    if not layers:
        return False
    evaluation = _read_json(run_dir / STAGE_DIRS["evaluate"] / MARKER) or {}
    height = max(3.0, 0.28 * len(layers) + 1.4)
    fig = _figure(9.0, height)
    ax = fig.subplots()
    names = [row["layer"] for row in layers]
    kept = [row["kept"] for row in layers]
    colors = ["C0" if row["type"] == "Conv2d" else "C2" for row in layers]
    y = range(len(layers))
    ax.barh(y, [1.0] * len(layers), color="#e8e8e8", height=0.7)
    ax.barh(y, kept, color=colors, height=0.7)
    for i, row in enumerate(layers):
        shape = "x".join(map(str, row["shape"]))
        ax.text(min(row["kept"], 1.0) + 0.01, i, f"{100 * row['kept']:.1f}%  ({row['nonzero']:,}/{row['dense']:,}, "
                f"{shape})", va="center", fontsize=7)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_xlabel("weights kept in the final model (non-zero, vs the dense layer)")
    if evaluation.get("sparsity") is not None:
        ax.axvline(1 - evaluation["sparsity"], color="C3", ls="--", lw=1.2,
                   label=f"all conv layers: {100 * (1 - evaluation['sparsity']):.1f}% kept")
    from matplotlib.patches import Patch

    handles = [Patch(color="C0", label="Conv2d"), Patch(color="C2", label="Linear"),
               Patch(color="#e8e8e8", label="removed or zero")]
    existing = ax.get_legend_handles_labels()[0]
    fig.legend(handles=existing + handles, loc="outside lower center", ncols=4, fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    recipe = subject.recipe
    what = f"{recipe.prune.describe()['target']} ({recipe.prune.method}, {recipe.prune.describe()['granularity']})" if recipe.prune else "dense"
    compacted = "compacted" if (_read_json(run_dir / STAGE_DIRS["compact"] / MARKER) or {}).get("compacted") else \
        "dense shapes"
    fig.suptitle(f"kept weights per layer: {_run_id(run_dir)}, {what}, {compacted}", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------ markdown
def _write_markdown(subject: Subject, images: list[Path]) -> Path:
    path = subject.out_dir / "report.md"
    lines = [f"# prunekit report: {subject.label}", ""]
    rows = []
    if subject.store is not None:
        ids = [_run_id(d) for d in subject.run_dirs]
        rows = subject.store.rows(run_ids=ids)
    if rows:
        comparison = compare(rows)
        lines += ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in comparison.rows]
        if comparison.skipped:
            lines += ["", "not done: " + ", ".join(f"{k} ({v})" for k, v in comparison.skipped.items())]
        lines.append("")
    for image in images:
        lines += [f"![{image.stem}]({image.name})", ""]
    with atomic_open(path) as handle:
        handle.write("\n".join(lines))
    return path
