import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli


def malformed_cifar(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"not a pickle")
    return tmp_path


TRAIN = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1"]

BAD_INPUTS = [
    (["train", "--model", "resnet2000", "--data", "digits"], "unknown model 'resnet2000'; known:"),
    (["train", "--model", "resnet20", "--data", "cifar11"], "unknown dataset 'cifar11'; known:"),
    (["train", "--model", "resnet20", "--data", "cifar10", "--data-dir", "{tmp}/nowhere"], "--data-dir"),
    (["train", "--model", "resnet20", "--data", "cifar10", "--data-dir", "{malformed}"], "data_batch_1"),
    ([*TRAIN, "--epochs", "-3"], "argument --epochs: expected a positive integer, got '-3'"),
    ([*TRAIN, "--epochs", "ten"], "argument --epochs: expected a positive integer, got 'ten'"),
    ([*TRAIN, "--lr", "0"], "argument --lr: expected a positive number, got '0'"),
    ([*TRAIN, "--lr", "inf"], "argument --lr: expected a positive number, got 'inf'"),
    ([*TRAIN, "--lr", "٠.١"], "argument --lr: expected a positive number, got '٠.١'"),
    ([*TRAIN, "--epochs", "٣"], "argument --epochs: expected a positive integer, got '٣'"),
    ([*TRAIN, "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    ([*TRAIN, "--momentum", "1.5"], "momentum: expected a number in [0, 1), got 1.5"),
    ([*TRAIN, "--weight-decay", "-1"], "weight_decay: expected a number >= 0, got -1.0"),
    ([*TRAIN, "--label-smoothing", "abc"], "argument --label-smoothing"),
    ([*TRAIN, "--lr-plan", "cosin"], "argument --lr-plan: invalid choice: 'cosin'"),
    ([*TRAIN, "--resume", "--out", "{tmp}/fresh"], "--resume: "),
    (["macs", "resnet20", "--input", "3x32xZ"], "argument --input: expected CxHxW such as 3x32x32"),
    (["macs", "nonet"], "unknown model 'nonet'"),
    (["eval", "{tmp}/no-model"], "has no model.json"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_code_2(capsys, tmp_path, args, message):
    malformed = malformed_cifar(tmp_path / "malformed")
    args = [a.format(tmp=tmp_path, malformed=malformed) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "fresh").exists()


def test_existing_run_is_not_overwritten_without_resume(capsys, tmp_path):
    assert run_cli(capsys, *TRAIN, "--out", tmp_path)[0] == 0
    code, _, err = run_cli(capsys, *TRAIN, "--out", tmp_path)
    assert code == 2 and "already holds a run; pass --resume" in err


def test_resume_uses_the_recorded_settings_and_extend_is_recorded(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, *TRAIN, "--lr", "0.05", "--out", run)[0] == 0
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume")  # nothing to do: it is finished
    assert code == 0, err
    record = json.loads((run / "train_config.json").read_text())
    assert record["lr"] == 0.05 and "extended_from" not in record
    epochs = record["epochs"]
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--extend", "--epochs", epochs + 1)
    assert code == 0, err
    record = json.loads((run / "train_config.json").read_text())
    assert record["epochs"] == epochs + 1 and record["extended_from"] == epochs and record["lr"] == 0.05
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(1, epochs + 2))
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--lr", "0.2")  # the default, but not this run's
    assert code == 2 and "--lr: 0.2 contradicts the run's recorded 0.05" in err


def test_macs_json_matches_the_reference_counts(capsys):
    code, out, _ = run_cli(capsys, "macs", "resnet56", "--input", "3x32x32", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["macs"] == 126_554_816
    assert report["params"] == 853_018
    assert report["by_type"]["BatchNorm2d"] == 1_064_960


def test_train_then_eval_agree(capsys, tmp_path):
    code, out, _ = run_cli(capsys, *TRAIN, "--epochs", "3", "--precision", "fp32", "--out", tmp_path)
    assert code == 0 and "final test accuracy" in out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.json", "model.safetensors", "metrics.jsonl", "result.json", "train_config.json"} <= files
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    result = json.loads((tmp_path / "result.json").read_text())
    code, out, _ = run_cli(capsys, "eval", tmp_path, "--json")
    assert code == 0
    assert json.loads(out)["test_acc"] == pytest.approx(result["final_test_acc"], abs=1e-12)


def test_demo_prints_its_table(capsys):
    code, out, _ = run_cli(capsys, "demo", "--epochs", "2", "--finetune-epochs", "1")
    assert code == 0
    for text in ("dense", "pruned", "fine-tuned", "MACs", "params"):
        assert text in out


def cli_process(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "prunekit", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    args = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "25", "--precision", "fp32"]
    reference = cli_process(*args, "--out", tmp_path / "ref", cwd=tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    victim = cli_process(*args, "--out", tmp_path / "run", cwd=tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (checkpoint.exists()
                                               and torch.load(checkpoint, weights_only=True)["epoch"] >= 3):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 3 <= killed_at < 25, "the run must die mid-way for this test to mean anything"

    resumed = cli_process(*args, "--out", tmp_path / "run", "--resume", cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected = load_file(tmp_path / "ref" / "model.safetensors")
    actual = load_file(tmp_path / "run" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 25


def test_console_entry_point_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "prunekit", "macs", "resnet20", "--json"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["macs"] == 40_932_032


def test_eval_checks_the_model_against_the_data_set_up_front(capsys, tmp_path):
    from prunekit.artifact import ModelSpec, save_artifact
    from prunekit.models import build_model

    save_artifact(build_model("resnet20"), ModelSpec(model="resnet20", num_classes=10, data="cifar10"), tmp_path)
    code, _, err = run_cli(capsys, "eval", tmp_path, "--data", "digits")
    assert code == 2 and err.strip().splitlines() == [
        "prunekit eval: error: --data: the model takes 3x32x32 inputs with 10 classes (cifar10); digits has "
        "1x8x8 inputs with 10 classes"], err


def test_output_is_not_wrapped_when_not_a_terminal(capsys, tmp_path):
    """Logs and pipes get whole lines: a path longer than the 120 columns stays on one line."""
    out = tmp_path / ("run-" + "x" * 150)
    code, printed, err = run_cli(capsys, *TRAIN, "--out", out)
    assert code == 0, err
    assert any(str(out) in line for line in printed.splitlines()), printed
