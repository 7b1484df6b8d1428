"""End to end from the CLI: a short real run (ResNet-20, CIFAR-10 subset), then runs/compare/report."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics

import pytest
from safetensors.torch import load_file

from cli_runner import run_cli
from conftest import SHARED_DATA
from exp_helpers import TINY, recipe, write_recipe
from prunekit.experiment import report
from prunekit.experiment.loggers import FileLogger
from prunekit.experiment.store import COLUMNS, ResultsStore

RESNET20 = {
    "name": "r20_demo",
    "model": {"name": "resnet20"},
    "data": {"name": "cifar10", "data_dir": str(SHARED_DATA), "subset": 2000, "batch_size": 128},
    "train": {"epochs": 1, "lr": 0.1},
    "prune": {"method": "oneshot", "target": "weights=0.5", "criterion": "l1"},
    "retrain": {"epochs": 1, "lr": 0.02, "lr_plan": "cosine"},
}


@pytest.mark.slow
def test_resnet20_cifar10_recipe_end_to_end(capsys, tmp_path):
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR-10 is not in ../shared/data")
    file = write_recipe(tmp_path / "r20.yaml", RESNET20)
    runs = tmp_path / "runs"
    code, out, err = run_cli(capsys, "run", file, "--out", runs)
    assert code == 0, err
    (group,) = [p for p in runs.iterdir() if p.is_dir()]
    run_dir = group / "s0"
    for name in ("recipe.yaml", "run.json", "result.json", "metrics.jsonl", "metrics.csv", "train/model.safetensors",
                 "train/checkpoints/last.pt", "prune/masks.safetensors", "retrain/metrics.jsonl",
                 "final/model.json", "evaluate/layers.json", "evaluate/stage.json"):
        assert (run_dir / name).is_file(), name
    assert (group / "recipe.yaml").is_file() and (group / "group.json").is_file()

    # the store row, and the run's own record of it, agree
    store = ResultsStore(runs / "results.sqlite")
    (row,) = store.rows()
    result = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "done" and row["run_id"] == f"{group.name}/s0" and row["model"] == "resnet20"
    assert row["method"] == "oneshot" and row["target"] == "weights=0.5" and row["data"] == "cifar10"
    assert row["sparsity"] == pytest.approx(0.5, abs=1e-3) and "conv weights" in row["sparsity_covers"]
    assert row["macs"] == row["dense_macs"] == 40_932_032  # unstructured: MACs do not shrink
    assert 0.0 < row["final_test_acc"] <= 1.0 and row["best_test_acc"] >= row["final_test_acc"]
    assert row["final_test_acc"] == result["final_test_acc"] and row["wall_time_s"] > 0
    assert row["git_commit"] and row["run_dir"] == f"{group.name}/s0"
    final = load_file(run_dir / "final" / "model.safetensors")
    conv = [t for k, t in final.items() if k.endswith("weight") and t.dim() == 4]
    assert sum(int((t == 0).sum()) for t in conv) / sum(t.numel() for t in conv) == pytest.approx(0.5, abs=1e-3)

    code, out, _ = run_cli(capsys, "runs", "--store", runs / "results.sqlite", "--json", "--filter", "model=resnet20")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == [row["run_id"]]
    code, out, err = run_cli(capsys, "runs", "--store", runs / "results.sqlite")
    assert code == 0 and "done" in out, err

    code, out, err = run_cli(capsys, "compare", group)
    assert code == 0, err
    table = list(csv.DictReader((runs / "compare.csv").open()))
    assert len(table) == 1 and float(table[0]["final_test_acc_mean"]) == pytest.approx(row["final_test_acc"])
    assert "weights=0.5" in (runs / "compare.md").read_text()
    code, out, err = run_cli(capsys, "compare", "--where", "method=oneshot", "--store", runs / "results.sqlite",
                         "--md", tmp_path / "c.md", "--csv", tmp_path / "c.csv")
    assert code == 0 and (tmp_path / "c.md").is_file() and (tmp_path / "c.csv").is_file(), err

    code, out, err = run_cli(capsys, "report", run_dir)
    assert code == 0, err
    for name in ("accuracy_vs_sparsity.png", "training_curves.png", "schedules.png", "layers.png"):
        png = run_dir / "report" / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, name
    assert "accuracy_vs_sparsity.png" in (run_dir / "report" / "report.md").read_text()


def test_tiny_recipe_with_seeds_export_and_missing_optional_logger(capsys, tmp_path, caplog, monkeypatch):
    data = recipe(TINY, prune={"method": "oneshot", "target": "filters=0.5"}, export={"onnx": True},
                  loggers=["tensorboard"])
    data["train"].update(epochs=1, lr_plan="cosine")
    data["retrain"]["epochs"] = 1
    file = write_recipe(tmp_path / "tiny.yaml", data)
    runs = tmp_path / "runs"
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli(capsys, "run", file, "--out", runs, "--seeds", "2")
    assert code == 0, err
    rows = ResultsStore(runs / "results.sqlite").rows()
    assert [r["seed"] for r in rows] == [0, 1] and all(r["status"] == "done" for r in rows)
    assert all(r["macs"] < r["dense_macs"] and r["params"] < r["dense_params"] for r in rows)  # compacted
    (group,) = [p for p in runs.iterdir() if p.is_dir()]
    assert (group / "s1" / "export" / "model.onnx").stat().st_size > 1000
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        assert "logger tensorboard skipped" in caplog.text
    # a second run of the same recipe is a replicate, not an overwrite
    code, _, err = run_cli(capsys, "run", file, "--out", runs, "--seeds", "1", "--set", "export.onnx=false")
    assert code == 0, err
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [group.name, f"{group.name}-2"]
    code, out, err = run_cli(capsys, "compare", group, f"{group.name}-2/s0")
    assert code == 0, err
    (line,) = [row for row in csv.DictReader((runs / "compare.csv").open())]
    accs = [r["final_test_acc"] for r in ResultsStore(runs / "results.sqlite").rows()]
    assert line["runs"] == "3"  # one recipe: 3 runs, mean ± sample std
    assert float(line["final_test_acc_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-6)
    assert float(line["final_test_acc_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-6)
    figures, save = {}, report._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    code, out, err = run_cli(capsys, "report", group)
    assert code == 0 and (group / "report" / "training_curves.png").is_file(), err
    _assert_schedules_plot(figures["schedules.png"], group / "s0")


def _assert_schedules_plot(fig, run_dir) -> None:
    """The plotted LR and sparsity, step by step: cosine from the peak to 0 in each stage, then 50%."""
    steps = [json.loads((run_dir / stage / "stage.json").read_text())["steps_per_epoch"]
             for stage in ("train", "retrain")]
    x, lr, sparsity = [0.0], [math.nan], [0.0]
    for epoch, (n, peak, level) in enumerate(zip(steps, (3.0e-3, 1.0e-3), (0.0, 0.5))):
        x += [epoch + (k + 1) / n for k in range(n)]
        lr += [peak * (1 + math.cos(math.pi * k / (n - 1))) / 2 for k in range(n)]
        sparsity += [level] * n
    ax_lr, ax_sparsity = fig.axes
    (lr_line,) = ax_lr.lines  # adamw with cosine: no momentum curve
    assert lr_line.get_xdata().tolist() == pytest.approx(x)
    assert lr_line.get_ydata().tolist() == pytest.approx(lr, nan_ok=True)
    assert ax_sparsity.lines[0].get_xdata().tolist() == pytest.approx(x)
    assert ax_sparsity.lines[0].get_ydata().tolist() == sparsity


def test_resume_and_compare_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--resume", tmp_path)
    assert code == 2 and "is neither a run directory" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "run")
    assert code == 2 and "give a recipe file" in err
    code, _, err = run_cli(capsys, "compare", "nothing", "--store", tmp_path / "none.sqlite")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "report", tmp_path / "nothing")
    assert code == 2 and "report:" in err


def test_runs_without_a_store_lists_none_and_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh directory: the default store runs/results.sqlite is absent
    code, out, err = run_cli(capsys, "runs")
    assert (code, err) == (0, "") and "0 runs in runs/results.sqlite" in out
    code, out, err = run_cli(capsys, "runs", "--json", "--store", tmp_path / "none.sqlite")
    assert (code, json.loads(out), err) == (0, [], "")
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(capsys, "runs", "--filter", "colour=red")  # filters are still checked
    assert code == 2 and err == f"prunekit runs: error: --filter: unknown key 'colour'; known: {', '.join(COLUMNS)}\n"
    (tmp_path / "runs").mkdir()
    code, _, err = run_cli(capsys, "runs", "--store", "runs")
    assert code == 2 and err == ("prunekit runs: error: --store: 'runs' is a directory; expected the store's file, "
                                 "e.g. 'runs/results.sqlite'\n")


def test_file_logger_never_logs_an_epoch_twice(tmp_path):
    logger = FileLogger(tmp_path)
    logger.log_epoch("train", {"epoch": 1, "test_acc": 0.5}, 1)
    logger.log_epoch("train", {"epoch": 2, "test_acc": 0.6}, 2)
    again = FileLogger(tmp_path)  # a resumed run re-logs epoch 2
    again.log_epoch("train", {"epoch": 2, "test_acc": 0.7}, 2)
    again.log_epoch("retrain", {"epoch": 1, "test_acc": 0.8}, 3)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["test_acc"]) for r in lines] == [("train", 1, 0.5), ("train", 2, 0.7),
                                                                        ("retrain", 1, 0.8)]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 4


def test_runtime_error_is_recorded_as_failed_and_reported_in_one_line(capsys, tmp_path):
    data = recipe(TINY, prune={"method": "oneshot", "target": "macs=0.999"}, retrain=None)
    data["train"]["epochs"] = 1
    file = write_recipe(tmp_path / "tiny.yaml", data)
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "run", file, "--out", runs)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    message = err.strip().split("error: ", 1)[1]  # the library's one-line reason (out of reach, ...)
    (row,) = ResultsStore(runs / "results.sqlite").rows()
    assert row["status"] == "failed" and message in row["error"] and row["final_test_acc"] is None
    run_dir = runs / row["run_dir"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    assert (run_dir / "train" / "stage.json").is_file() and not (run_dir / "prune" / "stage.json").exists()
    code, out, _ = run_cli(capsys, "runs", "--store", runs / "results.sqlite")
    assert code == 0 and "failed" in out


def test_a_run_in_progress_cannot_be_resumed_twice(capsys, tmp_path):
    import fcntl

    file = write_recipe(tmp_path / "tiny.yaml", recipe(TINY, prune=None, retrain=None))
    code, _, err = run_cli(capsys, "run", file, "--out", tmp_path / "runs", "--set", "train.epochs=1")
    assert code == 0, err
    (group,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    with open(group / "s0" / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a running process holds it
        code, _, err = run_cli(capsys, "run", "--resume", group / "s0")
    assert code == 2 and "being run by another process" in err
    code, out, err = run_cli(capsys, "run", "--resume", group / "s0")  # finished: every stage is skipped
    assert code == 0 and "train: already done, skipped" in out, err
