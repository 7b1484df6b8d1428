"""The One-Cycle Pruning experiment trains each arm through the recipe's own method: one arm run end
to end on a tiny fake CIFAR-10 reaches the recipe's sparsity and writes its result row."""

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ocp_experiment  # noqa: E402
from cifar_files import write_fake_cifar  # noqa: E402
from prunekit.data import cifar  # noqa: E402


@pytest.mark.parametrize("arm", ["dense", "one_cycle"])
def test_an_arm_trains_through_its_recipe_and_reports_what_it_reached(arm, tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "data", cifar.CIFAR10)
    monkeypatch.setattr(ocp_experiment, "RECIPES", ROOT / "recipes" / "ocp")
    monkeypatch.setattr(ocp_experiment, "RUNS", tmp_path / "runs")
    args = argparse.Namespace(data_dir=str(tmp_path / "data"), epochs=1, sparsity=0.9, subset=None)
    row = ocp_experiment.run_arm(arm, 0, args)
    assert (row["arm"], row["seed"], len(row["curve"])) == (arm, 0, 1)
    assert row["conv_sparsity"] == pytest.approx(0.0 if arm == "dense" else 0.9, abs=1e-3)
    assert 0.0 <= row["final_test_acc"] <= 1.0
    assert (tmp_path / "runs").is_dir()
