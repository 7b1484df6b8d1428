"""Recipe validation: every malformed recipe gives one line per problem naming the key path, exit
code 2, and leaves nothing behind (no run directory, no store)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from cli_runner import run_cli
from conftest import SHARED_DATA
from exp_helpers import recipe, write_recipe
from prunekit.methods import METHODS as PRUNE_METHODS
from prunekit.experiment.recipe import Recipe, RecipeError, load_recipe, validate_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"

BASE = {
    "name": "r20",
    "model": {"name": "resnet20"},
    "data": {"name": "cifar10", "data_dir": str(SHARED_DATA), "subset": 200},
    "train": {"epochs": 1},
    "prune": {"method": "oneshot", "target": "weights=0.5"},
    "retrain": {"epochs": 1, "lr_plan": "cosine"},
}


def edit(section: str, **values):
    """A recipe with keys of one section changed (a value of ... deletes the key)."""
    def make(tmp: Path) -> dict:
        data = recipe(BASE)
        node = data.setdefault(section, {})
        for key, value in values.items():
            if value is ...:
                node.pop(key, None)
            else:
                node[key] = value.format(tmp=tmp) if isinstance(value, str) else value
        return data

    return make


def top(**values):
    def make(tmp: Path) -> dict:
        data = recipe(BASE)
        for key, value in values.items():
            if value is ...:
                data.pop(key, None)
            else:
                data[key] = value
        return data

    return make


# (id, recipe maker or raw YAML, --set overrides, key path, message part)
MALFORMED = [
    ("typo-section", top(trian={"epochs": 1}), [], "trian", "unknown key; did you mean 'train'?"),
    ("typo-key", edit("train", epoch=3), [], "train.epoch", "unknown key; did you mean 'epochs'?"),
    ("typo-prune-key", edit("prune", granularty="weight"), [], "prune.granularty", "did you mean 'granularity'?"),
    ("epochs-not-int", edit("train", epochs="ten"), [], "train.epochs", "expected an integer, got 'ten'"),
    ("epochs-negative", edit("train", epochs=-3), [], "train.epochs", "expected an integer in [1, 10,000], got -3"),
    ("epochs-float", edit("retrain", epochs=2.5), [], "retrain.epochs", "expected an integer, got 2.5"),
    ("lr-string", edit("train", lr="fast"), [], "train.lr", "expected a number, got 'fast'"),
    ("lr-zero", edit("train", lr=0), [], "train.lr", "expected a number > 0, got 0"),
    ("momentum-range", edit("train", momentum=1.5), [], "train.momentum", "expected a number in [0, 1), got 1.5"),
    ("precision-choice", edit("train", precision="fp16"), [], "train.precision",
     "expected one of 'auto', 'bf16' or 'fp32', got 'fp16'"),
    ("bool-type", edit("data", augment="yes please"), [], "data.augment", "expected true or false"),
    ("percent-target", edit("prune", target="weights=90"), [], "prune.target",
     "expects a fraction removed in [0, 1], got 90.0; write weights=0.9 for 90%"),
    ("percent-sign", edit("prune", target="weights=90%"), [], "prune.target", "percentages are not accepted"),
    ("unitless-target", edit("prune", target=0.9), [], "prune.target", "needs a unit: write weights=0.9"),
    ("unitless-string", edit("prune", target="0.9"), [], "prune.target", "target needs a unit"),
    ("unknown-unit", edit("prune", target="params=0.5"), [], "prune.target", "unknown unit 'params'"),
    ("unit-vs-granularity", edit("prune", granularity="filter"), [], "prune.target",
     "does not fit granularity filter"),
    ("missing-target", edit("prune", target=...), [], "prune.target", "required key is missing"),
    ("unknown-model", edit("model", name="resnet2000"), [], "model.name", "unknown model 'resnet2000'; known:"),
    ("unknown-tv-model", edit("model", name="tv:resnet2000"), [], "model.name", "unknown torchvision"),
    ("unknown-dataset", edit("data", name="cifar11"), [], "data.name", "unknown dataset 'cifar11'"),
    ("missing-data-dir", edit("data", data_dir="{tmp}/nowhere"), [], "data.data_dir", "does not exist"),
    ("empty-data-dir", edit("data", data_dir="{tmp}"), [], "data.data_dir", "holds no complete cifar-10-batches-py"),
    ("subset-zero", edit("data", subset=0), [], "data.subset", "expected an integer >= 1, got 0"),
    ("unknown-method", edit("prune", method="magic"), [], "prune.method",
     "unknown pruning method 'magic'; known: autobot, filter_config, gradual, hyperspherical, oneshot"),
    ("missing-method", edit("prune", method=...), [], "prune.method", "required key is missing"),
    ("unknown-criterion", edit("prune", criterion="l3"), [], "prune.criterion", "unknown criterion 'l3'"),
    ("evidence-criterion", edit("prune", criterion="taylor"), [], "prune.criterion", "needs data evidence"),
    ("scope-choice", edit("prune", scope="everywhere"), [], "prune.scope", "expected one of 'local' or 'global'"),
    ("unknown-lr-plan", edit("retrain", lr_plan="cosin"), [], "retrain.lr_plan", "unknown LR plan 'cosin'"),
    ("lr-plan-args", edit("retrain", lr_plan_args={"gamma": 0.1}), [], "retrain.lr_plan_args",
     "'cosine' does not take gamma"),
    ("section-not-mapping", top(train=5), [], "train", "expected a mapping (key: value lines), got 5"),
    ("seeds-duplicate", top(seeds=[1, 1]), [], "seeds", "expected distinct seeds"),
    ("seeds-negative", top(seeds=[-1]), [], "seeds[0]", "expected an integer >= 0, got -1"),
    ("name-with-slash", top(name="a/b"), [], "name", "it names the run directory"),
    ("retrain-without-prune", top(prune=...), [], "retrain", "needs a prune section"),
    ("checkpoint-missing", edit("train", checkpoint="{tmp}/nope", epochs=...), [], "train.checkpoint",
     "has no model.json"),
    ("checkpoint-and-training", edit("train", checkpoint="{tmp}/nope"), [], "train.checkpoint",
     "cannot be combined with epochs"),
    ("gradual-needs-train", edit("prune", method="gradual"), [], "prune.train", "required key is missing"),
    ("target-removes-nothing", edit("prune", target="filters=0"), [], "prune.target", "filters=0 removes nothing"),
    ("target-removes-all", edit("prune", target="macs=1.0"), [], "prune.target", "macs=1 would remove all macs"),
    ("gradual-macs", edit("prune", method="gradual", target="macs=0.5", train={}), [], "prune.target",
     "needs method oneshot"),
    ("gradual-schedule-name", edit("prune", method="gradual", train={}, schedule={"name": "cubic"}), [],
     "prune.schedule.name", "unknown sparsity schedule 'cubic'"),
    ("gradual-window", edit("prune", method="gradual", train={}, schedule={"start": 0.8, "end": 0.2}), [],
     "prune.schedule.start", "expected start < end"),
    ("gradual-shape-param", edit("prune", method="gradual", train={}, schedule={"name": "agp", "params": {"n": 3}}),
     [], "prune.schedule.params", "'agp' does not take n"),
    ("filter-config-unknown", edit("prune", method="filter_config", config="resnet21-B", target=...), [],
     "prune.config", "unknown filter-pruning configuration 'resnet21-B'; known: resnet110-A"),
    ("filter-config-missing", edit("prune", method="filter_config", target=...), [], "prune.config",
     "required key is missing"),
    ("filter-config-target", edit("prune", method="filter_config", config="resnet20-B"), [], "prune.target",
     "unknown key; expected one of method, config, criterion"),
    ("filter-config-scope", edit("prune", method="filter_config", config="resnet20-B", target=..., scope="global"),
     [], "prune.scope", "unknown key; expected one of method, config, criterion"),
    ("filter-config-granularity", edit("prune", method="filter_config", config="resnet20-B", target=...,
                                       granularity="weight"), [], "prune.granularity", "unknown key"),
    ("rewind-point-late", edit("train", rewind_points=[0, 3]), [], "train.rewind_points",
     "[3] lie beyond the 1 training epochs"),
    ("rewind-original-epochs", edit("retrain", lr_plan="lr_rewind", lr_plan_args={"original_epochs": 40}), [],
     "retrain.lr_plan_args.original_epochs", "expected 1 (train.epochs: the original run it replays), got 40"),
    ("rewind-needs-original", edit("retrain", lr_plan="lr_rewind", lr_plan_args={}), [], "retrain.lr_plan_args",
     "'lr_rewind' needs original_epochs"),
    ("weight-rewind-without-training", top(train=...), ["retrain.lr_plan=weight_rewind",
                                                        "retrain.lr_plan_args={original_epochs: 1}"],
     "retrain.lr_plan", "weight_rewind needs the original training"),
    ("set-negative-epochs", top(), ["train.epochs=-1"], "train.epochs", "expected an integer in [1, 10,000], got -1"),
    ("set-typo", top(), ["train.epohcs=5"], "train.epohcs", "did you mean 'epochs'?"),
    ("set-malformed", top(), ["train.epochs"], "--set", "expected KEY.PATH=VALUE"),
    ("set-through-scalar", top(), ["model.name.x=1"], "model.name", "not a section"),
    ("yaml-syntax", "name: [unclosed\n", [], "recipe", "invalid YAML at line"),
    ("yaml-duplicate", "name: a\nname: b\n", [], "recipe", "duplicate key 'name'"),
    ("empty-file", "", [], "recipe", "is empty"),
    ("not-a-mapping", "- a\n- b\n", [], "recipe", "expected a mapping of sections"),
]


@pytest.mark.parametrize("make, overrides, path, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, make, overrides, path, message):
    data = make if isinstance(make, str) else make(tmp_path)
    file = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "runs"
    sets = [arg for item in overrides for arg in ("--set", item)]
    code, stdout, err = run_cli(capsys, "run", file, "--out", out, *sets)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prunekit run: error: {path}: "), lines[0]
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists(), "a rejected recipe must leave no run directory and no store"


def test_at_least_fifteen_malformed_recipes():
    assert len(MALFORMED) >= 15


def test_every_problem_is_reported_one_line_each(capsys, tmp_path):
    data = recipe(BASE)
    data["train"].update(epochs=-3, momentum=2)
    data["prune"]["target"] = "weights=90"
    data["model"]["name"] = "nonet"
    file = write_recipe(tmp_path / "recipe.yaml", data)
    code, _, err = run_cli(capsys, "run", file, "--out", tmp_path / "runs")
    assert code == 2
    paths = sorted(line.split(": ")[2] for line in err.strip().splitlines())
    assert paths == ["model.name", "prune.target", "train.epochs", "train.momentum"]
    assert not (tmp_path / "runs").exists()


def test_resolved_recipe_round_trips_with_the_same_digest(tmp_path):
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", BASE), ["train.lr=1e-2", "seeds=3"])
    assert loaded.train.lr == 0.01 and loaded.seeds == [0, 1, 2]
    assert loaded.prune.granularity == "weight"  # inferred from the target's unit and written out
    again = load_recipe(write_recipe(tmp_path / "resolved.yaml", loaded.to_yaml()))
    assert again.resolved() == loaded.resolved()
    assert again.digest() == loaded.digest()
    # what does not change results does not change the digest; what does, does
    assert load_recipe(tmp_path / "r.yaml", ["name=other", "seeds=[4]"]).digest() == \
        load_recipe(tmp_path / "r.yaml").digest()
    assert load_recipe(tmp_path / "r.yaml", ["train.epochs=2"]).digest() != load_recipe(tmp_path / "r.yaml").digest()


def test_gradual_schedule_params_are_filled_in(tmp_path):
    data = recipe(BASE, prune={"method": "gradual", "target": "filters=0.5", "train": {"epochs": 2}})
    loaded = validate_recipe(data)
    assert loaded.prune.schedule.params == {"alpha": 14.0, "beta": 5.0}
    assert loaded.prune.sparsity_schedule()(1.0) == 0.5
    assert [stage for stage, _ in loaded.phases()] == ["train", "prune", "retrain"]


def test_overrides_parse_yaml_scalars(tmp_path):
    file = write_recipe(tmp_path / "r.yaml", BASE)
    loaded = load_recipe(file, ["retrain.nesterov=false", "retrain.lr_plan_args={warmup_epochs: 0.5}",
                                "prune.target=filters=0.25", "prune.granularity=filter"])
    assert loaded.retrain.nesterov is False
    assert loaded.retrain.lr_plan_args == {"warmup_epochs": 0.5}
    assert loaded.prune.target == "filters=0.25"
    with pytest.raises(RecipeError) as info:
        load_recipe(file, ["train.epochs='5'"])
    assert str(info.value) == "train.epochs: expected an integer, got '5'"


def _keys(model: type[BaseModel], prefix: str) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(f"{prefix}{name}")
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys |= _keys(arg, f"{prefix}{name}.")
    return keys


def test_docs_describe_every_recipe_key():
    text = DOCS.read_text()
    keys = _keys(Recipe, "")
    for method in PRUNE_METHODS:
        keys |= _keys(PRUNE_METHODS.get(method), "prune.")
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", text))
    missing = sorted(k for k in keys if k not in documented and k.split(".")[-1] not in documented)
    assert not missing, f"docs/recipes.md does not mention {missing}"


def test_example_recipe_is_valid(monkeypatch):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # its data_dir is relative to the repository root, like every CLI path
    example = load_recipe(root / "recipes" / "resnet20_magnitude_demo.yaml")
    assert example.model.name == "resnet20" and example.data.name == "cifar10"
    assert example.prune is not None and example.retrain is not None
