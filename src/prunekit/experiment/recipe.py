"""Recipes: one YAML file describes a whole experiment; validated before anything runs.

:func:`load_recipe` reads the YAML, applies ``--set key.path=value`` overrides (values parsed as
YAML scalars), and validates everything: unknown keys (with a "did you mean"), types, ranges,
names (model, data set, method, criterion, schedules, LR plans), target units. The schema only
describes: what needs the filesystem (that the data directory holds the data, that a start
checkpoint exists and fits, what the recipe's plug-ins need on disk) is checked afterwards by
:func:`preflight`, still before anything runs. Every problem becomes one :class:`Problem`
naming its key path; all of them are raised together as :class:`RecipeError`.

A validated :class:`Recipe` dumps itself fully resolved (defaults filled in) with
:meth:`Recipe.to_yaml`; loading that dump gives the same recipe and the same :meth:`Recipe.digest`.
See ``docs/recipes.md`` for every key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from prunekit.data import DATASETS
from prunekit.data.cifar import CIFAR10, CIFAR100, resolve_data_dir
from prunekit.device import resolve_device
from prunekit.errors import UserError
from prunekit.methods import METHODS, Method, plugins_for, validate_method
from prunekit.schema import BatchSize, NonNegativeInt, PositiveInt, Section, TrainSpec, registered
from prunekit.models import MODELS, TV_PREFIX

LOGGERS = ("tensorboard", "mlflow")
MAX_SEEDS = 1000
"""More seeds than this in one recipe is a typo, not an experiment."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# ------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class RecipeError(UserError):
    """One or more problems in a recipe; ``str()`` gives one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


# ----------------------------------------------------------------------------- sections
class ModelSection(Section):
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name.startswith(TV_PREFIX):
            import torchvision

            if name[len(TV_PREFIX):] not in torchvision.models.list_models(module=torchvision.models):
                raise ValueError(f"unknown torchvision classification model {name[len(TV_PREFIX):]!r}")
        elif name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS.names())}, or "
                             f"{TV_PREFIX}<torchvision name>")
        return name


class DataSection(Section):
    name: Annotated[str, registered(DATASETS)]
    data_dir: str | None = None
    batch_size: BatchSize = 128
    test_batch_size: BatchSize = 512
    subset: PositiveInt | None = None
    augment: bool = True
    download: bool = False


class TrainSection(TrainSpec):
    """Dense training, or ``checkpoint:`` a saved model directory to start from instead.

    ``rewind_points``: epochs after which the weights are saved (``train/rewind/``) for weight
    rewinding later; a retraining plan that rewinds weights adds the epoch it needs itself.
    """

    checkpoint: str | None = None
    rewind_points: list[NonNegativeInt] = Field(default_factory=list)

    @field_validator("rewind_points")
    @classmethod
    def _distinct_points(cls, points: list[int]) -> list[int]:
        return sorted(set(points))

    @model_validator(mode="after")
    def _checkpoint(self) -> TrainSection:
        if self.checkpoint is None:
            late = [e for e in self.rewind_points if e > self.epochs]
            if late:
                raise ValueError(f"rewind_points: {late} lie beyond the {self.epochs} training epochs")
            return self
        if not self.checkpoint.strip():
            raise ValueError("checkpoint: expected a model directory, got an empty string")
        others = sorted(self.model_fields_set - {"checkpoint"})
        if others:
            raise ValueError(f"checkpoint: skips dense training, so it cannot be combined with "
                             f"{', '.join(others)}")
        return self


class EvaluateSection(Section):
    precision: Literal["fp32", "bf16"] = "fp32"
    latency: bool = False
    latency_batch_size: PositiveInt = 32


class ExportSection(Section):
    onnx: bool = False


class Recipe(Section):
    """A whole experiment. Sections run as stages: train → prune → retrain → compact → evaluate → export."""

    name: str
    model: ModelSection
    data: DataSection
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0])
    device: str = "auto"
    train: TrainSection | None = None
    prune: SerializeAsAny[Method] | None = None
    retrain: TrainSpec | None = None
    compact: bool = True
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"expected letters, digits, '_', '-' or '.' (it names the run directory), got {name!r}")
        return name

    @field_validator("model", "data", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, seeds: Any) -> Any:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if not 1 <= seeds <= MAX_SEEDS:
                raise ValueError(f"expected a number of seeds in [1, {MAX_SEEDS}] or a list of seeds, got {seeds!r}")
            return list(range(seeds))
        if isinstance(seeds, list) and len(seeds) > MAX_SEEDS:
            raise ValueError(f"expected at most {MAX_SEEDS} seeds, got {len(seeds)}")
        return seeds

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("expected at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"expected distinct seeds, got {seeds}")
        return seeds

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {device!r}")
        return device

    @field_validator("prune", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return validate_method(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.retrain is not None and self.prune is None:
            raise ValueError("retrain: needs a prune section (retraining fine-tunes the pruned model)")
        return self

    # ------------------------------------------------------------------ views
    def resolved(self) -> dict[str, Any]:
        """Every key with its value, defaults filled in (JSON types)."""
        data = self.model_dump(mode="json")
        if self.train is not None and self.train.checkpoint:
            data["train"] = {"checkpoint": self.train.checkpoint}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=False, width=100)

    def digest(self) -> str:
        """SHA-256 of what determines the results: the resolved recipe without ``name``, ``seeds``,
        ``device``, ``loggers``, ``export`` and the data location (``data_dir``, ``download``)."""
        data = self.resolved()
        for key in ("name", "seeds", "device", "loggers", "export"):
            data.pop(key, None)
        data["data"] = {k: v for k, v in data["data"].items() if k not in ("data_dir", "download")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def with_seed(self, seed: int) -> Recipe:
        return self.model_copy(update={"seeds": [seed]})

    def phases(self) -> list[tuple[str, TrainSpec]]:
        """The training phases in order, as (stage, spec): what the LR-plan plot draws."""
        out: list[tuple[str, TrainSpec]] = []
        if self.train is not None and not self.train.checkpoint:
            out.append(("train", self.train))
        if self.prune is not None and self.prune.phase() is not None:
            out.append(("prune", self.prune.phase()))
        if self.retrain is not None:
            out.append(("retrain", self.retrain))
        return out


# ---------------------------------------------------------------------------- preflight
def _data_problems(data: DataSection) -> None:
    """Raise ValueError when the data set is not where the section says."""
    if data.name == "digits":
        return
    root = resolve_data_dir(data.data_dir)
    unset = "" if data.data_dir else " (data_dir unset: $PRUNEKIT_DATA or ./data)"
    if data.name == "imagefolder":
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise ValueError(f"data.data_dir: {str(root)!r} has no {' or '.join(missing)} folder "
                             f"(imagefolder expects ROOT/train and ROOT/val){unset}")
        return
    spec = {"cifar10": CIFAR10, "cifar100": CIFAR100}.get(data.name)
    if spec is None or data.download:
        return
    if not root.is_dir():
        raise ValueError(f"data.data_dir: {str(root)!r} does not exist{unset} (or set data.download: true)")
    files = spec.train_files + spec.test_files
    if not any(all((folder / f).is_file() for f in files) for folder in (root, root / spec.folder)):
        raise ValueError(f"data.data_dir: {str(root)!r} holds no complete {spec.folder}{unset} "
                         "(or set data.download: true)")


def _checkpoint_problems(recipe: Recipe) -> None:
    checkpoint = recipe.train.checkpoint
    spec = Path(checkpoint) / "model.json"
    if not spec.is_file():
        raise ValueError(f"train.checkpoint: {checkpoint!r} has no model.json (expected a directory "
                         "written by prunekit train or a run's train/ stage)")
    try:
        saved = json.loads(spec.read_text())
    except ValueError:
        raise ValueError(f"train.checkpoint: {str(spec)!r} is not valid JSON") from None
    if not isinstance(saved, dict):
        raise ValueError(f"train.checkpoint: {str(spec)!r} is not a model spec")
    if saved.get("manifest"):
        raise ValueError(f"train.checkpoint: {checkpoint!r} is already compacted; start from its dense model")
    if saved.get("model") != recipe.model.name:
        raise ValueError(f"train.checkpoint: holds a {saved.get('model')!r} model, but model.name is "
                         f"{recipe.model.name!r}")


def _export_problems(recipe: Recipe) -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if recipe.export.onnx and missing:
        raise ValueError(f"export.onnx: needs {', '.join(missing)}; pip install 'prunekit[onnx]'")


def _device_problems(recipe: Recipe) -> None:
    try:
        resolve_device(recipe.device)
    except UserError as exc:
        raise ValueError(str(exc)) from None


def preflight(recipe: Recipe) -> None:
    """Check what the recipe needs from the filesystem and the installation (data, checkpoint,
    device, what its plug-ins need); :class:`RecipeError` lists every problem."""
    checks = [lambda: _data_problems(recipe.data), lambda: _export_problems(recipe), lambda: _device_problems(recipe)]
    if recipe.train is not None and recipe.train.checkpoint:
        checks.append(lambda: _checkpoint_problems(recipe))
    checks += [lambda plugin=plugin: plugin.check_recipe(recipe) for plugin in plugins_for(recipe)]
    problems = []
    for check in checks:
        try:
            check()
        except ValueError as exc:
            path, _, message = str(exc).partition(": ")
            problems.append(Problem(path, message) if message else Problem("recipe", path))
    if problems:
        raise RecipeError(problems)


# ------------------------------------------------------------------------------ loading
class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 1e-3 as a number (YAML 1.1 wants 1.0e-3) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        if context and "duplicate" in str(what):
            what = f"{what}"
        raise RecipeError([Problem(source, f"invalid YAML at{where}: {what}")]) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply ``key.path=value`` overrides in place (value parsed as YAML); problems for bad ones."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            problems.append(Problem("--set", f"expected KEY.PATH=VALUE such as train.epochs=5, got {item!r}"))
            continue
        try:
            value = parse_yaml(text, "--set") if text.strip() else None
        except RecipeError as exc:
            problems.append(Problem(f"--set {key}", exc.problems[0].message))
            continue
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(".".join(path[: depth + 1]), f"is {child!r}, not a section; cannot set {key!r}"))
                break
            node = child
        else:
            node[path[-1]] = value
    return problems


def validate_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from parsed YAML, or :class:`RecipeError` listing every problem."""
    if raw is None:
        raise RecipeError([Problem(source, "is empty; expected the sections name, model, data, ...")])
    if not isinstance(raw, dict):
        raise RecipeError([Problem(source, f"expected a mapping of sections (name:, model:, ...), got {_kind(raw)}")])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_problem(error, raw) for error in exc.errors()]
        raise RecipeError(_dedupe(problems)) from None
    preflight(recipe)
    return recipe


def validate_prune(section: Any, source: str = "prune") -> Method:
    """A ``prune`` section on its own (what ``prunekit prune`` builds from its flags), worded like a
    recipe's problems (``prune.key: problem``); :class:`RecipeError` lists every problem."""
    try:
        return validate_method(section)
    except ValidationError as exc:
        problems = [_problem({**error, "loc": (source, *error["loc"])}, {source: section}) for error in exc.errors()]
        raise RecipeError(_dedupe(problems)) from None
    except ValueError as exc:  # no method, or an unknown one
        path, _, message = str(exc).partition(": ")
        raise RecipeError([Problem(f"{source}.{path}", message)]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, seeds: int | None = None) -> Recipe:
    """Read, override and validate a recipe file (``seeds`` overrides the recipe's seeds with 0..N-1)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError([Problem("recipe", f"{str(path)!r} does not exist")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem("recipe", f"cannot read {str(path)!r} ({exc})")]) from None
    raw = parse_yaml(text, "recipe")
    if isinstance(raw, dict):
        problems = apply_overrides(raw, list(overrides or []))
        if seeds is not None:
            raw["seeds"] = seeds
        if problems:
            raise RecipeError(problems)
    return validate_recipe(raw, "recipe")


# ---------------------------------------------------------------------- error wording
_MESSAGES = {
    "missing": lambda e: "required key is missing",
    "int_type": lambda e: f"expected an integer, got {_show(e['input'])}",
    "int_parsing": lambda e: f"expected an integer, got {_show(e['input'])}",
    "int_from_float": lambda e: f"expected an integer, got {_show(e['input'])}",
    "float_type": lambda e: f"expected a number, got {_show(e['input'])}",
    "float_parsing": lambda e: f"expected a number, got {_show(e['input'])}",
    "finite_number": lambda e: f"expected a finite number, got {_show(e['input'])}",
    "bool_type": lambda e: f"expected true or false, got {_show(e['input'])}",
    "bool_parsing": lambda e: f"expected true or false, got {_show(e['input'])}",
    "string_type": lambda e: f"expected a string, got {_show(e['input'])}",
    "list_type": lambda e: f"expected a list, got {_show(e['input'])}",
    "dict_type": lambda e: f"expected a mapping (key: value lines), got {_show(e['input'])}",
    "model_type": lambda e: f"expected a mapping (key: value lines), got {_show(e['input'])}",
    "model_attributes_type": lambda e: f"expected a mapping (key: value lines), got {_show(e['input'])}",
    "literal_error": lambda e: f"expected one of {e['ctx']['expected']}, got {_show(e['input'])}",
}

_KEY_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): ")


def _problem(error: dict[str, Any], raw: dict[str, Any]) -> Problem:
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
        known = _known_keys(loc[:-1], raw)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        message += f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(known)}"
    elif kind in _MESSAGES:
        message = _MESSAGES[kind](error)
    else:
        message = str(error["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        match = _KEY_PREFIX.match(message)
        if match:  # a validator named the key inside its section: move it into the path
            keys = match[1].split(".")
            if loc and str(loc[-1]) == keys[0]:
                keys = keys[1:]
            loc = loc + keys
            message = message[match.end():]
    return Problem(_path(loc), message)


def _path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _known_keys(loc: list[Any], raw: dict[str, Any]) -> list[str]:
    """The keys the section at ``loc`` accepts (for 'did you mean')."""
    cls: Any = Recipe
    node: Any = raw
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
        if cls is Recipe and part == "prune":
            method = node.get("method") if isinstance(node, dict) else None
            cls = METHODS.get(method) if method in METHODS else Method
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        cls = _model_of(field.annotation) if field else None
        if cls is None:
            return []
    return list(cls.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__)
