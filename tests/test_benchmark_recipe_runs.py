"""The benchmark experiments keep one run per seed: a second seed of an arm trains its own run
instead of reading back the first seed's (a group's name leaves the seeds out), a finished run is
read back, a crashed one is resumed in place and only returned once finished, and the newest of
several groups of one recipe is the one resumed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "experiment"))
import pytest  # noqa: E402
from exp_helpers import TINY, Crash, recipe, write_recipe  # noqa: E402
from recipe_runs import run_or_resume  # noqa: E402
from prunekit.experiment.recipe import load_recipe  # noqa: E402
from prunekit.experiment.runner import RESULT_FILE, STORE_NAME, run_recipe  # noqa: E402


def tiny(tmp_path, seed, epochs=1):
    path = write_recipe(tmp_path / "tiny.yaml", recipe(train={**TINY["train"], "epochs": epochs}, retrain=None))
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


def test_a_crashed_run_is_resumed_in_place_and_returned_only_once_finished(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(tiny(tmp_path, 0, epochs=2), out / "seed0", store=out / STORE_NAME, source="test",
                   hooks_for=lambda stage: [Crash(epoch=1, step_in_epoch=3)])
    (group,) = (out / "seed0").iterdir()
    row = run_or_resume(tiny(tmp_path, 0, epochs=2), out, source="test")
    assert Path(row["run_dir"]).parent == group  # the crashed group, not a new one
    result = json.loads((Path(row["run_dir"]) / RESULT_FILE).read_text())
    assert result["status"] == "done"
    epochs = [json.loads(line)["epoch"] for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
