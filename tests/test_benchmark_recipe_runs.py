"""The benchmark experiments keep one run per seed: a second seed of an arm trains its own run
instead of reading back the first seed's (a group's name leaves the seeds out), a finished run is
read back, and the newest of several groups of one recipe is the one resumed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "experiment"))
from exp_helpers import TINY, recipe, write_recipe  # noqa: E402
from recipe_runs import run_or_resume  # noqa: E402
from prunekit.experiment.recipe import load_recipe  # noqa: E402
from prunekit.experiment.runner import STORE_NAME, run_recipe  # noqa: E402


def tiny(tmp_path, seed):
    path = write_recipe(tmp_path / "tiny.yaml", recipe(train={**TINY["train"], "epochs": 1}, retrain=None))
    return load_recipe(path, [f"seeds=[{seed}]"])


def test_each_seed_has_its_own_run_and_a_finished_one_is_read_back(tmp_path):
    first, second = (run_or_resume(tiny(tmp_path, seed), tmp_path / "runs", source="test") for seed in (0, 1))
    assert (Path(first["run_dir"]).name, Path(second["run_dir"]).name) == ("s0", "s1")
    assert Path(first["run_dir"]).parents[1].name == "seed0"
    assert first["run_id"] != second["run_id"]
    again = run_or_resume(tiny(tmp_path, 0), tmp_path / "runs", source="test")
    assert (again["run_dir"], again["run_id"]) == (first["run_dir"], first["run_id"])


def test_the_newest_group_of_a_recipe_is_the_one_read_back(tmp_path):
    out = tmp_path / "runs"
    first = run_or_resume(tiny(tmp_path, 0), out, source="test")
    (newer,) = run_recipe(tiny(tmp_path, 0), out / "seed0", store=out / STORE_NAME, source="test")
    assert Path(newer["run_dir"]).parent.name == Path(first["run_dir"]).parent.name + "-2"
    again = run_or_resume(tiny(tmp_path, 0), out, source="test")
    assert (again["run_dir"], again["run_id"]) == (newer["run_dir"], newer["run_id"])
