"""The Pruning On-the-Fly experiment keeps one run per seed: a second seed of an arm trains its
own run instead of reading back the first seed's (a group's name leaves the seeds out)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "experiment"))
from exp_helpers import TINY, recipe, write_recipe  # noqa: E402
from hyperspherical_experiment import run_or_resume  # noqa: E402
from prunekit.experiment.recipe import load_recipe  # noqa: E402


def test_each_seed_has_its_own_run_and_a_finished_one_is_read_back(tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", recipe(train={**TINY["train"], "epochs": 1}, retrain=None))
    first, second = (run_or_resume(load_recipe(path, [f"seeds=[{seed}]"]), tmp_path / "runs") for seed in (0, 1))
    assert (Path(first["run_dir"]).name, Path(second["run_dir"]).name) == ("s0", "s1")
    assert first["run_id"] != second["run_id"]
    again = run_or_resume(load_recipe(path, ["seeds=[0]"]), tmp_path / "runs")
    assert (again["run_dir"], again["run_id"]) == (first["run_dir"], first["run_id"])
