"""``prunekit lr-plan``: table, JSON values, the plot file, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_lr_plan(capsys, *args):
    return run_cli(capsys, "lr-plan", *args)


def test_json_lr_rewind_t72(capsys):
    code, out, err = run_lr_plan(capsys, "lr_rewind", "--original-epochs", 160, "--budget", 72, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["epoch"] for row in rows] == list(range(72))
    assert [row["lr"] for row in rows] == pytest.approx([0.01] * 32 + [0.001] * 40)
    assert all(row.keys() == {"epoch", "lr"} for row in rows)  # no momentum: the step original has none


def test_json_scaled_restart_and_imagenet_preset(capsys):
    code, out, _ = run_lr_plan(capsys, "scaled_restart", "--budget", 72, "--json")
    lrs = [row["lr"] for row in json.loads(out)]
    assert code == 0 and lrs[1] == pytest.approx(0.0059, abs=5e-5) and lrs[38] == 0.1 and lrs[39] == pytest.approx(0.01)
    code, out, _ = run_lr_plan(capsys, "lr_rewind", "--original-epochs", 90, "--budget", 45, "--preset", "imagenet",
                               "--json")
    assert code == 0
    assert [row["lr"] for row in json.loads(out)] == pytest.approx([0.01] * 15 + [0.001] * 30)


def test_json_cyclic_restart_has_momentum(capsys):
    code, out, _ = run_lr_plan(capsys, "cyclic_restart", "--budget", 10, "--steps-per-epoch", 100, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 10
    assert rows[0]["lr"] == pytest.approx(0.001) and rows[0]["momentum"] == pytest.approx(0.95)
    assert rows[1]["lr"] == pytest.approx(0.1, rel=1e-4) and rows[1]["momentum"] == pytest.approx(0.85, abs=1e-4)


def test_all_plans_table_and_json(capsys):
    code, out, err = run_lr_plan(capsys, "all", "--original-epochs", 40, "--budget", 10)
    assert code == 0, err
    assert "scaled_restart: warm-up 1 epoch 0.001→0.1" in out
    header = out.split("┏")[1].split("┡")[0]  # rich wraps the last column's title at 120 columns
    assert "cyclic_restart lr" in header and header.count("momentum") == 1
    code, out, _ = run_lr_plan(capsys, "all", "--original-epochs", 40, "--budget", 10, "--json")
    tables = json.loads(out)
    assert list(tables) == ["finetune", "lr_rewind", "weight_rewind", "scaled_restart", "cyclic_restart"]
    assert tables["lr_rewind"] == tables["weight_rewind"]
    lrw = [row["lr"] for row in tables["lr_rewind"]]
    assert lrw == pytest.approx([row["lr"] for row in tables["finetune"]])  # t ≤ T/4: LRW is FT here


def test_plot_writes_a_png(capsys, tmp_path):
    target = tmp_path / "figs" / "plans.png"
    code, out, err = run_lr_plan(capsys, "all", "--original-epochs", 40, "--budget", 20, "--steps-per-epoch", 50,
                                 "--json", "--plot", target)
    assert code == 0, err
    json.loads(out)  # stdout stays pure JSON with --plot
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    assert [p.name for p in target.parent.iterdir()] == ["plans.png"]  # no temporary file left


def test_original_onecycle_is_replayed_per_iteration(capsys):
    code, out, _ = run_lr_plan(capsys, "lr_rewind", "--original-epochs", 40, "--budget", 20, "--original", "onecycle",
                               "--steps-per-epoch", 10, "--json")
    rows = json.loads(out)
    assert code == 0 and "momentum" in rows[0] and rows[0]["lr"] > rows[-1]["lr"]


BAD = [
    (["lr_rewind", "--budget", "10"], "--original-epochs: lr_rewind replays the original schedule"),
    (["lr_rewind", "--original-epochs", "40", "--budget", "50"], "epochs: a rewinding budget of t=50 epochs exceeds"),
    (["rewind", "--budget", "10"], "name: unknown retraining plan 'rewind'; known: finetune"),
    (["finetune", "--budget", "0"], "argument --budget: expected a positive integer, got '0'"),
    (["finetune", "--budget", "10", "--steps-per-epoch", "x"],
     "argument --steps-per-epoch: expected a positive integer"),
    (["cyclic_restart", "--budget", "10", "--preset", "mnist"], "argument --preset: invalid choice: 'mnist'"),
    (["finetune", "--budget", "10", "--plot", "plans.jpg"], "--plot: expected a file name ending in .png, .pdf, .svg"),
    (["lr_rewind", "--original-epochs", "40", "--budget", "10", "--original", "cosine", "--milestones", "20"],
     "--milestones: only a step original has milestones"),
    (["lr_rewind", "--original-epochs", "40", "--budget", "10", "--milestones", "a,b"],
     "argument --milestones: expected comma-separated epochs"),
    (["finetune", "--budget", "10", "--lr", "-1"], "argument --lr: expected a positive number"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_values_are_one_line_errors(capsys, args, message):
    code, out, err = run_lr_plan(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
