"""A run killed or crashed mid-epoch continues with ``prunekit run --resume`` and ends exactly where an
uninterrupted run with the same seed ends; a crash is recorded as a failure, never as a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from exp_helpers import TINY, Crash, recipe, write_recipe
from prunekit.experiment.recipe import load_recipe
from prunekit.experiment.runner import run_recipe
from prunekit.experiment.store import RESULT_COLUMNS, ResultsStore

REPO = Path(__file__).resolve().parents[2]


def only_run(group_dir: Path) -> Path:
    (run_dir,) = [p for p in group_dir.iterdir() if p.is_dir()]
    return run_dir


def assert_same_outcome(run_dir: Path, reference_dir: Path, stages: tuple[str, ...]) -> None:
    """Bit-identical final weights, identical per-epoch metrics and identical final accuracy."""
    for folder in ("final", *stages):
        got = load_file(run_dir / folder / "model.safetensors")
        want = load_file(reference_dir / folder / "model.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), folder

    def curve(directory: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [(r["stage"], r["epoch"], r["train_loss"], r["train_acc"], r["test_acc"], r["lr"]) for r in rows]

    assert curve(run_dir) == curve(reference_dir)
    got, want = (json.loads((d / "result.json").read_text()) for d in (run_dir, reference_dir))
    for key in ("final_test_acc", "best_test_acc", "dense_test_acc", "sparsity", "macs", "params"):
        assert got[key] == want[key], key


def test_crash_mid_epoch_is_recorded_as_failed_then_resumes_exactly(capsys, caplog, tmp_path):
    file = write_recipe(tmp_path / "tiny.yaml", TINY)
    runs = tmp_path / "runs"
    crash = lambda stage: [Crash(epoch=1, step_in_epoch=7)] if stage == "retrain" else []  # noqa: E731
    try:
        run_recipe(load_recipe(file), runs, hooks_for=crash)
        raise AssertionError("the crash hook did not fire")
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    (group,) = [p for p in runs.iterdir() if p.is_dir()]
    run_dir = only_run(group)
    store = ResultsStore(runs / "results.sqlite")
    row = store.get(json.loads((run_dir / "run.json").read_text())["run_id"])
    assert row["status"] == "failed" and row["error"] == "RuntimeError: simulated crash mid-epoch"
    assert all(row[k] is None for k in RESULT_COLUMNS), "a failed run holds no result"
    assert torch.load(run_dir / "retrain" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "retrain" / "stage.json").exists()

    caplog.set_level("INFO", logger="prunekit.train.trainer")
    code, out, err = run_cli(capsys, "run", "--resume", run_dir)
    assert code == 0, err
    assert "train: already done, skipped" in out and "prune: already done, skipped" in out
    assert "checkpoints/last.pt at epoch 1" in caplog.text  # the retrain stage continued, not restarted
    row = store.get(row["run_id"])
    assert row["status"] == "done" and row["error"] is None and row["final_test_acc"] is not None

    # the uninterrupted reference, run from the crashed run's own resolved recipe
    code, _, err = run_cli(capsys, "run", run_dir / "recipe.yaml", "--out", tmp_path / "ref")
    assert code == 0, err
    reference = only_run(next(p for p in (tmp_path / "ref").iterdir() if p.is_dir()))
    assert_same_outcome(run_dir, reference, ("train", "prune", "retrain"))
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 2 + 3  # header, no epoch twice


GRADUAL = recipe(
    TINY, train=None, retrain=None,
    prune={"method": "gradual", "target": "filters=0.5", "every": 4, "schedule": {"name": "agp"},
           "train": {"epochs": 4, "optimizer": "adamw", "lr": 3.0e-3, "precision": "fp32"}},
)

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from prunekit.experiment.recipe import load_recipe
    from prunekit.experiment.runner import run_recipe
    from prunekit.train.hooks import Hook

    class Kill(Hook):
        def on_step_begin(self, trainer):
            if trainer.global_step == 2 * trainer.steps_per_epoch + 9:  # mid epoch 3 of 4
                os.kill(os.getpid(), signal.SIGKILL)

    run_recipe(load_recipe(sys.argv[1]), sys.argv[2], hooks_for=lambda s: [Kill()] if s == "prune" else [])
""")


def test_sigkill_mid_epoch_of_gradual_pruning_then_resume_matches(capsys, tmp_path):
    file = write_recipe(tmp_path / "gradual.yaml", GRADUAL)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(file), str(runs)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    run_dir = only_run(next(p for p in runs.iterdir() if p.is_dir()))
    assert torch.load(run_dir / "prune" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    store = ResultsStore(runs / "results.sqlite")
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert store.get(run_id)["status"] == "running"  # killed: nobody could record anything

    code, _, err = run_cli(capsys, "run", "--resume", run_dir.parent)  # a group directory resumes its runs
    assert code == 0, err
    assert store.get(run_id)["status"] == "done"
    code, _, err = run_cli(capsys, "run", file, "--out", tmp_path / "ref")
    assert code == 0, err
    reference = only_run(next(p for p in (tmp_path / "ref").iterdir() if p.is_dir()))
    assert_same_outcome(run_dir, reference, ("prune",))
    final = json.loads((run_dir / "final" / "stage.json").read_text())
    evaluation = json.loads((run_dir / "evaluate" / "stage.json").read_text())
    assert final["compacted"] and final["macs"] < evaluation["dense_macs"]


def test_resume_refuses_a_run_whose_recipe_was_edited(capsys, tmp_path):
    from cli_runner import run_cli

    recipe_path = write_recipe(tmp_path / "r.yaml", recipe(TINY, retrain=None, prune=None))
    run_recipe(load_recipe(recipe_path), tmp_path / "runs")
    (group,) = (tmp_path / "runs").glob("tiny-*")
    run_dir = only_run(group)
    stored = (run_dir / "recipe.yaml").read_text()
    (run_dir / "recipe.yaml").write_text(stored.replace("epochs: 2", "epochs: 3"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".lock" not in p.name)
    code, _, err = run_cli(capsys, "run", "--resume", run_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no longer describes this run" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".lock" not in p.name) == before
    (run_dir / "recipe.yaml").write_text(stored)  # the recorded recipe resumes (nothing left to do)
    assert run_cli(capsys, "run", "--resume", run_dir)[0] == 0
