"""User mistakes through the real entry point (``prunekit.cli.main.main``), one row each.

Every row must end with exit code 2, exactly one stderr line that names the key, flag or path,
no traceback, and nothing left behind: the temporary working directory holds the same files,
byte for byte, before and after. To cover a new defect, add a :class:`Case` to ``CASES`` (with
a ``setup`` that writes the files the command needs, relative to the working directory).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from cifar_files import payloads, write_fake_cifar, write_payload_batch
from cli_runner import run_cli
from prunekit.artifact import ModelSpec, save_artifact
from prunekit.cli.main import main
from prunekit.data import cifar
from prunekit.models import build_model

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "resnet20_magnitude_demo.yaml"
UNWRITABLE = "/sys/prunekit-user-errors"
"""A folder no one can create, not even root (the tests run as root, for whom chmod-read-only
folders stay writable); ``afile/...`` paths, under a regular file, are the portable other way."""


def a_file(cwd: Path) -> None:
    (cwd / "afile").write_text("a file, not a folder\n")


def not_sqlite(cwd: Path) -> None:
    (cwd / "notes.txt").write_text("hello, not a database\n")


def cifar_model(cwd: Path) -> None:
    """``model/``: an untrained small CNN saved for CIFAR-10, and ``afile``."""
    a_file(cwd)
    spec = ModelSpec(model="small_cnn", num_classes=10, in_channels=3, input_shape=(3, 32, 32), data="cifar10")
    save_artifact(build_model("small_cnn", num_classes=10, in_channels=3), spec, cwd / "model")


def crafted(file: str, *, nested: bool, model: bool = False) -> Callable[[Path], None]:
    """``crafted/``: fake CIFAR-10 whose ``file`` runs ``touch marker.npy`` under a plain unpickler
    (the unchanged-tree check shows it did not run)."""

    def setup(cwd: Path) -> None:
        if model:
            cifar_model(cwd)
        folder = write_fake_cifar(cwd / "crafted", cifar.CIFAR10)
        write_payload_batch(folder / file, payloads(cwd / "marker.npy")["os.system"], nested=nested)

    return setup


def damaged(file: str, how: str, *, model: bool = False) -> Callable[[Path], None]:
    """``damaged/``: fake CIFAR-10 whose ``file`` is cut in half or replaced by random bytes."""

    def setup(cwd: Path) -> None:
        if model:
            cifar_model(cwd)
        path = write_fake_cifar(cwd / "damaged", cifar.CIFAR10) / file
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2] if how == "truncated" else bytes(reversed(whole)))

    return setup


def _nothing(cwd: Path) -> None:
    pass


def finished_run(cwd: Path) -> None:
    """``run/``: a finished 1-epoch small_cnn run on digits (lr 0.2, the default)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--subset", "256",
                     "--out", str(cwd / "run")]) == 0


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    names: str
    """What the one stderr line must contain: the key, flag or path the mistake is about."""
    setup: Callable[[Path], None] = _nothing
    env: dict[str, str] = field(default_factory=dict)


TRAIN_CIFAR = ("train", "--model", "small_cnn", "--data", "cifar10", "--epochs", "1", "--out", "run")
TRAIN_DIGITS = ("train", "--model", "small_cnn", "--data", "digits", "--epochs", "1")
BATCHES = "cifar-10-batches-py/"

CASES = [
    # defect 6: macs --input
    Case("macs-input-two-dims", ("macs", "resnet20", "--input", "3x32"), "argument --input: expected CxHxW"),
    Case("macs-input-four-dims", ("macs", "resnet20", "--input", "3x32x32x1"), "argument --input: expected CxHxW"),
    Case("macs-input-negative", ("macs", "resnet20", "--input", "3x-32x32"), "argument --input: expected CxHxW"),
    Case("macs-input-non-ascii", ("macs", "resnet20", "--input", "٣x32x32"), "argument --input: expected CxHxW"),
    Case("macs-input-huge", ("macs", "resnet20", "--input", "3x100000x100000"), "--input: expected CxHxW with "
         "C*H*W at most 16,777,216 (3x2048x2048 fits), got '3x100000x100000' (30,000,000,000 values)"),
    Case("macs-input-too-small", ("macs", "vgg16_bn", "--input", "3x2x2"), "--input: vgg16_bn cannot run on 3x2x2"),
    Case("macs-input-channels", ("macs", "model", "--input", "1x32x32"),
         "--input: model takes 3 input channels, got 1x32x32", cifar_model),
    # defect 16: --data-dir
    Case("data-dir-empty", (*TRAIN_CIFAR, "--data-dir", ""), "data dir is an empty string (--data-dir"),
    Case("data-dir-file", (*TRAIN_CIFAR, "--data-dir", "afile"), "data dir 'afile' is a file", a_file),
    Case("data-dir-under-file", (*TRAIN_CIFAR, "--data-dir", "afile/cifar"),
         "data dir 'afile/cifar' lies under the file 'afile'", a_file),
    Case("data-dir-file-eval", ("eval", "model", "--data-dir", "afile"), "data dir 'afile' is a file", cifar_model),
    Case("prunekit-data-file", TRAIN_CIFAR, "data dir 'afile' is a file", a_file, env={"PRUNEKIT_DATA": "afile"}),
    Case("recipe-data-dir-empty", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", 'data.data_dir=""'),
         "data dir is an empty string"),
    Case("recipe-data-dir-file", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "data.data_dir=afile"),
         "data dir 'afile' is a file", a_file),
    # defect 11: code in a data file
    Case("payload-train", (*TRAIN_CIFAR, "--data-dir", "crafted"), BATCHES + "data_batch_1': refused to load",
         crafted("data_batch_1", nested=False)),
    Case("payload-eval", ("eval", "model", "--data-dir", "crafted"), BATCHES + "test_batch': refused to load",
         crafted("test_batch", nested=True, model=True)),
    # defect 2 (data files): truncated and random batches
    Case("truncated-batch-train", (*TRAIN_CIFAR, "--data-dir", "damaged"), BATCHES + "data_batch_3",
         damaged("data_batch_3", "truncated")),
    Case("random-batch-eval", ("eval", "model", "--data-dir", "damaged"), BATCHES + "test_batch",
         damaged("test_batch", "random", model=True)),
    # defect 4: a store that is not SQLite
    Case("store-not-sqlite-runs", ("runs", "--store", "notes.txt"), "store 'notes.txt' cannot be used", not_sqlite),
    Case("store-not-sqlite-compare", ("compare", "--store", "notes.txt", "--where", "model=x"),
         "store 'notes.txt' cannot be used", not_sqlite),
    # defect 3: outputs that cannot be written
    Case("train-out-under-file", (*TRAIN_DIGITS, "--out", "afile/run"),
         "cannot write 'afile/run/train_config.json': 'afile' is a file", a_file),
    Case("train-out-unwritable", (*TRAIN_DIGITS, "--out", UNWRITABLE), f"cannot write '{UNWRITABLE}/"),
    Case("prune-out-under-file", ("prune", "model", "--target", "filters=0.5", "--out", "afile/pruned"),
         "cannot write 'afile/pruned/", cifar_model),
    Case("export-onnx-under-file", ("export", "model", "--onnx", "afile/model.onnx"),
         "cannot write 'afile/model.onnx'", cifar_model),
    Case("run-resume-a-file", ("run", "--resume", "afile"),
         "--resume: 'afile' is neither a run directory (run.json) nor a group directory", a_file),
    # defect 9: a resume that contradicts the recorded run
    Case("resume-other-model", ("train", "--model", "resnet20", "--out", "run", "--resume"),
         "--model: 'resnet20' contradicts the run's recorded 'small_cnn'", finished_run),
    Case("resume-other-lr", ("train", "--out", "run", "--resume", "--lr", "0.5"),
         "--lr: 0.5 contradicts the run's recorded 0.2", finished_run),
    Case("resume-longer-without-extend", ("train", "--out", "run", "--resume", "--epochs", "3"),
         "--epochs: 3 contradicts the run's recorded 1; --resume continues the recorded settings (add --extend",
         finished_run),
    Case("extend-without-resume", (*TRAIN_DIGITS, "--extend", "--out", "run"), "--extend: only with --resume"),
    Case("extend-not-longer", ("train", "--out", "run", "--resume", "--extend"),
         "--extend: give a --epochs larger than the run's recorded 1", finished_run),
    # defect 5: budgets and batches beyond any real run
    Case("train-epochs-huge", (*TRAIN_DIGITS, "--epochs", "1000000000000", "--out", "run"),
         "epochs: expected an integer in [1, 10,000], got 1000000000000"),
    Case("train-batch-huge", (*TRAIN_DIGITS, "--batch-size", "1000000000", "--out", "run"),
         "batch_size must be an integer in [1, 65,536], got 1000000000"),
    Case("recipe-epochs-huge", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "train.epochs=1000000000000"),
         "train.epochs: expected an integer in [1, 10,000]"),
    Case("recipe-batch-huge", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "data.batch_size=1000000000"),
         "data.batch_size: expected an integer in [1, 65,536]"),
    # defect 12: checks that must happen before a run directory or a store row exists
    Case("recipe-truncated-data", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "data.data_dir=damaged"),
         BATCHES + "data_batch_3", damaged("data_batch_3", "truncated")),
    # defects 1, 5, 7, 12, 16 (fixed earlier; here so that the table holds every case)
    Case("target-removes-nothing-recipe", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "prune.target=filters=0"),
         "prune.target: filters=0 removes nothing; expected a fraction removed in (0, 1)"),
    Case("target-removes-everything", ("run", str(DEMO_RECIPE), "--out", "runs", "--set", "prune.target=macs=1.0"),
         "prune.target: macs=1 would remove all macs"),
    Case("seeds-huge", ("run", str(DEMO_RECIPE), "--out", "runs", "--seeds", "1000000000000"),
         "seeds: expected a number of seeds in [1, 1000]"),
    Case("eval-other-data", ("eval", "model", "--data", "digits"),
         "--data: the model takes 3x32x32 inputs with 10 classes (cifar10); digits has 1x8x8", cifar_model),
    Case("target-non-ascii", ("prune", "model", "--target", "weights=٠.٥", "--out", "pruned"),
         "--target: expected a number (ASCII digits) after 'weights='", cifar_model),
    # defect 13: a target that cannot be met
    Case("target-removes-nothing", ("prune", "model", "--target", "filters=0.5", "--round-to", "100000", "--out",
                                    "pruned"),
         "prune.target: filters=0.5 removed nothing (round_to=100000 keeps every unit of every layer)", cifar_model),
    Case("schedule-plot-unwritable", ("schedule", "agp", "--final", "0.5", "--plot", f"{UNWRITABLE}.png"),
         f"cannot write '{UNWRITABLE}.png'"),
]


def _tree(root: Path) -> list[tuple[str, object]]:
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes()) for p in root.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    case.setup(tmp_path)
    before = _tree(tmp_path)
    code, out, err = run_cli(capsys, *case.argv)
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"prunekit {case.argv[0]}: error: ") and case.names in lines[0], lines[0]
    assert _tree(tmp_path) == before
    assert not Path(UNWRITABLE).exists()


def test_an_unavailable_cuda_device_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    data = REPO.parent / "shared" / "data"
    for argv in (("run", str(DEMO_RECIPE), "--out", "runs", "--set", "device=cuda", "--set", f"data.data_dir={data}"),
                 (*TRAIN_DIGITS, "--device", "cuda", "--out", "run")):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "cuda was requested but no CUDA device is available" in err
    assert list(tmp_path.iterdir()) == []
