"""``prunekit schedule``: table, JSON values, the plot file, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli
from prunekit.core.schedules import build_schedule

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_schedule(capsys, *args):
    return run_cli(capsys, "schedule", *args)


def test_json_lists_the_curve(capsys):
    code, out, err = run_schedule(capsys, "one_cycle", "--final", "0.9", "--points", "11", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["p"] for row in rows] == [i / 10 for i in range(11)]
    schedule = build_schedule("one_cycle", 0.9)
    assert [row["sparsity"] for row in rows] == [schedule(i / 10) for i in range(11)]
    assert rows[-1]["sparsity"] == 0.9
    assert rows[4]["sparsity"] == pytest.approx(0.6457 * 0.9, abs=1e-4)


def test_json_honours_window_and_shape_arguments(capsys):
    code, out, _ = run_schedule(capsys, "iterative", "--final", "0.9", "--start", "0.2", "--steps", "2",
                                "--points", "6", "--json")
    assert code == 0
    assert [round(row["sparsity"], 12) for row in json.loads(out)] == [0.0, 0.0, 0.45, 0.45, 0.9, 0.9]
    code, out, _ = run_schedule(capsys, "one_cycle", "--final", "1", "--beta", "6", "--points", "3", "--json")
    assert json.loads(out)[1]["sparsity"] == pytest.approx(0.7313, abs=5e-5)


def test_table_names_the_schedule(capsys):
    code, out, _ = run_schedule(capsys, "agp", "--final", "0.9", "--initial", "0.3", "--start", "0.2",
                                "--points", "5")
    assert code == 0
    assert "agp: 0.3 → 0.9, window [0.2, 1]" in out
    assert "90.00" in out and "30.00" in out


def test_plot_writes_a_png(capsys, tmp_path):
    target = tmp_path / "figs" / "ocp.png"
    code, out, err = run_schedule(capsys, "one_cycle", "--final", "0.9", "--json", "--plot", target)
    assert code == 0, err
    json.loads(out)  # stdout stays pure JSON with --plot
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    assert [p.name for p in target.parent.iterdir()] == ["ocp.png"]  # no temporary file left


BAD = [
    (["agp", "--final", "90"], "final: expected a sparsity fraction in [0, 1], got 90.0; write 0.9 for 90%"),
    (["agp", "--final", "0.9", "--start", "0.8", "--end", "0.3"], "start: expected start < end"),
    (["agpp", "--final", "0.9"], "unknown sparsity schedule 'agpp'; known: agp, cosine, iterative"),
    (["agp", "--final", "0.9", "--alpha", "3"], "--alpha: only one_cycle takes it, not agp"),
    (["one_cycle", "--final", "0.9", "--steps", "3"], "--steps: only iterative takes it"),
    (["agp", "--final", "abc"], "argument --final: expected a number, got 'abc'"),
    (["agp", "--final", "0.9", "--points", "1"], "argument --points: expected an integer >= 2"),
    (["iterative", "--final", "0.9", "--steps", "0"], "argument --steps: expected a positive integer"),
    (["agp"], "the following arguments are required: --final"),
    (["agp", "--final", "0.9", "--plot", "curve.jpeg"], "--plot: expected a file name ending in .png"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gives_one_line_and_exit_code_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_schedule(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []
