"""Fuzzing recipe validation: the repository's recipes, mutated (keys dropped, duplicated, renamed,
retyped and added; random numbers and strings; ``--set`` overrides; the data section), either
validate or raise RecipeError / UserError with one line per problem, never another exception,
each within a few seconds.

Runs from the repository root, where the recipes' ``data_dir: ../shared/data`` and
``train.checkpoint: benchmarks/...`` resolve. Derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import copy
import json
import re
import resource
import signal
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from prunekit.errors import UserError
from prunekit.experiment.recipe import RecipeError, load_recipe, validate_recipe

SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
REPO = Path(__file__).resolve().parents[1]
BASES = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted((REPO / "recipes").rglob("*.yaml"))}
TREES = {name: yaml.safe_load(text) for name, text in BASES.items()}
EXAMPLES = 520
SECONDS_PER_EXAMPLE = 5.0
EXTRA_MEMORY = 1 << 30
"""Address space the fuzzing may add: past it an allocation fails (MemoryError, a failed example)
instead of filling a shared machine's memory."""

KEYS = ["name", "model", "data", "seeds", "device", "train", "prune", "retrain", "compact", "evaluate", "export",
        "loggers", "data_dir", "batch_size", "test_batch_size", "subset", "augment", "download", "checkpoint",
        "rewind_points", "epochs", "optimizer", "lr", "lr_plan", "lr_plan_args", "momentum", "nesterov",
        "weight_decay", "decay_norm_and_bias", "betas", "eps", "label_smoothing", "precision", "channels_last",
        "eval_every", "method", "target", "granularity", "criterion", "scope", "layers", "include_first_conv",
        "include_classifier", "round_to", "config", "schedule", "every", "monotone", "start", "end", "alpha",
        "original_epochs", "original_milestones", "latency", "latency_batch_size", "onnx", "allow_empty"]
TOKENS = ["oneshot", "gradual", "filter_config", "weights=0.5", "weights=0", "weights=1", "filters=0", "filters=1.0",
          "filters=0.5", "macs=0", "macs=1.0", "macs=0.5", "weights=٠.٥", "weights=-0.5", "params=0.5", "filters=50%",
          "weight", "filter", "nm:2:4", "nm:0:0", "nm:4:2", "l1", "l2", "random", "global", "local", "agp", "cosine",
          "one_shot", "iterative", "linear", "onecycle", "step", "lr_rewind", "weight_rewind", "scaled_restart", "sgd",
          "adamw", "fp32", "bf16", "auto", "cpu", "cuda:7", "mps", "resnet20", "small_cnn", "vgg16_bn", "tv:resnet18",
          "tv:not_a_model", "resnet20-B", "resnet56-A", "digits", "cifar10", "cifar100", "imagefolder", "tensorboard",
          "mlflow", "features.0.0", "conv*", "true", "null", "1e-3", "0x10", "1_000", ".inf", "~", "*", ""]
DATA_DIRS = ["../shared/data", "../shared/data/cifar-10-batches-py", "../shared", "", " ", "pyproject.toml",
             "pyproject.toml/cifar", "no/such/folder", "~no-such-user-h6/data", ".", None, 7, ["../shared/data"]]
CHECKPOINTS = ["benchmarks/checkpoints/resnet20_cifar10_step30", "benchmarks/checkpoints", "pyproject.toml", "", None]
VALID_SETS = ["train.epochs=2", "seeds=[0, 1]", "seeds=2", "prune.target=weights=0.8", "data.subset=100",
              "data.data_dir=../shared/data", "data.name=digits", "model=small_cnn", "device=cpu",
              "evaluate.latency=true", "compact=false", "retrain.lr=0.01", "prune.criterion=random"]
MALFORMED_SETS = ["noequals", "=5", "a..b=1", ".x=1", "train.=3", "train.epochs", "train.epochs=[",
                  "train.epochs=!!python/object/apply:os.system ['true']", "data.data_dir=", "prune=null",
                  "seeds=&a [1, *a]", "model.name.deeper=1", "data={name: digits", "train.epochs=1e400"]
YAML_SPECIALS = list(":-[]{},'\"\t#&*!|>%@`? \n")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20), st.sampled_from(TOKENS),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6)
                                                                | st.integers(-3, 3) | st.none(), inner, max_size=3),
    max_leaves=6,
)
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1, 0.5, 1e-9, 2**31, 2**63, 10**12, 10**100, 1e308]))


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a parsed recipe (sections, leaves and list items)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out = []
    for key, child in items:
        out += [prefix + (key,), *key_paths(child, prefix + (key,))]
    return out


def at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def section(tree: dict, name: str) -> dict:
    """``tree[name]``, made an empty mapping first unless it is one."""
    if not isinstance(tree.get(name), dict):
        tree[name] = {}
    return tree[name]


def typo(word: str, draw) -> str:
    if not word:
        return draw(st.sampled_from(KEYS))
    i = draw(st.integers(0, len(word) - 1))
    return draw(st.sampled_from([word[:i] + word[i + 1:], word[:i] + "x" + word[i:], word.upper(), word + "s"]))


def mutate_tree(tree: dict, draw) -> None:
    """One structural change of the parsed recipe, in place."""
    paths = key_paths(tree)
    op = draw(st.sampled_from(["drop", "retype", "rename", "add", "number", "tweak", "data", "checkpoint",
                               "section"]))
    if op == "tweak":  # a plausible value of the same type: often still valid
        leaves = [p for p in paths if type(at(tree, p)) in (int, float)]
        if leaves:
            path = draw(st.sampled_from(leaves))
            small = st.integers(1, 40) if type(at(tree, path)) is int else st.floats(1e-4, 0.95)
            at(tree, path[:-1])[path[-1]] = draw(small)
    elif op in ("drop", "retype", "rename", "number") and paths:
        path = draw(st.sampled_from(paths))
        node = at(tree, path[:-1])
        if op == "drop":
            del node[path[-1]]
        elif op == "retype":
            node[path[-1]] = draw(values)
        elif op == "number":
            node[path[-1]] = draw(numbers)
        elif isinstance(node, dict):
            node[typo(str(path[-1]), draw)] = node.pop(path[-1])
    elif op == "add":
        node = at(tree, draw(st.sampled_from([()] + [p for p in paths if isinstance(at(tree, p), dict)])))
        node[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = draw(values)
    elif op == "data":
        key, choices = draw(st.sampled_from([
            ("data_dir", st.sampled_from(DATA_DIRS)),
            ("name", st.sampled_from(["cifar10", "cifar100", "digits", "imagefolder", "cifar11", "", 10])),
            ("download", st.sampled_from([True, False, "yes", 3, None])),
            ("subset", numbers), ("batch_size", numbers)]))
        section(tree, "data")[key] = draw(choices)
    elif op == "checkpoint":
        section(tree, "train")["checkpoint"] = draw(st.sampled_from(CHECKPOINTS))
    else:  # a whole section replaced by a scalar, a list or an empty mapping
        tree[draw(st.sampled_from(["model", "data", "train", "prune", "retrain", "evaluate", "export"]))] = draw(
            st.sampled_from([None, {}, [], "digits", 3]) | values)


def mutate_text(text: str, draw) -> str:
    """One change of the YAML text: a duplicated key line, or one character inserted or deleted."""
    lines = text.split("\n")
    keyed = [i for i, line in enumerate(lines) if re.match(r"^\s*[A-Za-z_]\w*\s*:", line)]
    op = draw(st.sampled_from(["duplicate", "insert", "delete"]))
    if op == "duplicate" and keyed:
        i = draw(st.sampled_from(keyed))
        return "\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
    if not text:
        return text
    at = draw(st.integers(0, len(text) - 1))
    if op == "delete":
        return text[:at] + text[at + 1:]
    return text[:at] + draw(st.sampled_from(YAML_SPECIALS)) + text[at:]


def override(draw, tree: dict) -> str:
    """One ``--set KEY.PATH=VALUE``: an existing or random key path, a value as YAML text, or a
    malformed item."""
    kind = draw(st.sampled_from(["existing", "random", "valid", "malformed"]))
    if kind in ("valid", "malformed"):
        return draw(st.sampled_from(VALID_SETS if kind == "valid" else MALFORMED_SETS))
    if kind == "existing" and key_paths(tree):
        path = ".".join(map(str, draw(st.sampled_from(key_paths(tree)))))
    else:
        path = ".".join(draw(st.lists(st.sampled_from(KEYS) | st.text("abcxyz_", min_size=1, max_size=5),
                                      min_size=1, max_size=3)))
    value = draw(st.one_of(values.map(lambda v: json.dumps(v, allow_nan=True)), st.sampled_from(TOKENS),
                           st.text(max_size=12)))
    return f"{path}={value}"


def mutated_recipe(draw) -> tuple[str, list[str], int | None]:
    """A recipe text, its ``--set`` overrides and a ``--seeds`` count (or None)."""
    base = draw(st.sampled_from(sorted(BASES)))
    text, tree = BASES[base], copy.deepcopy(TREES[base])
    tree_ops = draw(st.sampled_from([0, 1, 1, 2, 3, 4]))
    for _ in range(tree_ops):
        mutate_tree(tree, draw)
    if tree_ops:
        text = yaml.dump(tree, Dumper=SafeDumper, sort_keys=False, allow_unicode=True)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        text = mutate_text(text, draw)
    overrides = [override(draw, tree) for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3])))]
    seeds = draw(st.sampled_from([st.none()] * 3 + [st.sampled_from([2, 0, -1]), st.integers()]).flatmap(lambda s: s))
    return text, overrides, seeds


class _Timeout(Exception):
    pass


@contextmanager
def _memory_cap(extra: int) -> Iterator[None]:
    """Let the process map at most ``extra`` more bytes of address space than it has now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = mapped + extra if hard == resource.RLIM_INFINITY else min(hard, mapped + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def _time_cap(seconds: float) -> Iterator[None]:
    """Interrupt a runaway example after ``seconds`` (a slow one that swallows the interrupt is
    caught by the caller's elapsed-time check)."""

    def interrupt(signum, frame):
        raise _Timeout(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(path: Path, text: str, overrides: list[str], seeds: int | None) -> str:
    """``valid``, ``problems`` or ``error``; any other exception or a broken message fails."""
    path.write_text(text)
    try:
        recipe = load_recipe(path, overrides, seeds=seeds)
    except RecipeError as exc:
        assert exc.problems, "a RecipeError with no problem"
        for problem in exc.problems:
            assert "\n" not in str(problem) and problem.message.strip(), repr(str(problem))
        assert str(exc).split("\n") == [str(p) for p in exc.problems]
        return "problems"
    except UserError as exc:
        assert str(exc).strip() and "\n" not in str(exc), repr(str(exc))
        return "error"
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()))  # the documented round trip
    assert again.digest() == recipe.digest()
    return "valid"


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def test_mutated_recipes_validate_or_give_one_line_per_problem(at_repo_root, tmp_path):
    counts: Counter[str] = Counter()
    recipe_file = tmp_path / "recipe.yaml"

    # No shrinking: a failure reports its draws at once (shrinking a slow or MemoryError example takes
    # minutes), and derandomize makes every run draw the same examples.
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data):
        text, overrides, seeds = mutated_recipe(data.draw)
        start = time.perf_counter()
        with _time_cap(SECONDS_PER_EXAMPLE):
            counts[outcome(recipe_file, text, overrides, seeds)] += 1
        assert time.perf_counter() - start < SECONDS_PER_EXAMPLE

    with _memory_cap(EXTRA_MEMORY):
        fuzz()
    assert sum(counts.values()) >= 500, counts
    assert counts["valid"] >= 10 and counts["problems"] >= 250, counts  # the mutations reach both sides
