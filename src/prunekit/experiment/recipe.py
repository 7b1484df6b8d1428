"""Recipes: one YAML file describes a whole experiment; validated before anything runs.

:func:`load_recipe` reads the YAML, applies ``--set key.path=value`` overrides (values parsed as
YAML scalars), and validates everything: unknown keys (with a "did you mean"), types, ranges,
names (model, data set, method, criterion, schedules, LR plans), target units, that the data
directory holds the data, that a start checkpoint exists. Every problem becomes one
:class:`Problem` naming its key path; all of them are raised together as :class:`RecipeError`.

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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from prunekit.data import DATASETS
from prunekit.data.cifar import CIFAR10, CIFAR100, resolve_data_dir
from prunekit.errors import UserError
from prunekit.experiment.methods import PRUNE_METHODS, PruneSpec
from prunekit.experiment.schema import NonNegativeInt, PositiveInt, Section, TrainSpec
from prunekit.models import MODELS, TV_PREFIX

LOGGERS = ("tensorboard", "mlflow")
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
    name: str
    data_dir: str | None = None
    batch_size: PositiveInt = 128
    test_batch_size: PositiveInt = 512
    subset: PositiveInt | None = None
    augment: bool = True
    download: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}")
        return name

    @model_validator(mode="after")
    def _data_present(self) -> DataSection:
        if self.name == "digits":
            return self
        where = "data_dir" if self.data_dir else "data_dir (unset: $PRUNEKIT_DATA or ./data)"
        root = resolve_data_dir(self.data_dir)
        if self.name == "imagefolder":
            missing = [s for s in ("train", "val") if not (root / s).is_dir()]
            if missing:
                raise ValueError(f"{where}: {str(root)!r} has no {' or '.join(missing)} folder "
                                 "(imagefolder expects ROOT/train and ROOT/val)")
            return self
        spec = {"cifar10": CIFAR10, "cifar100": CIFAR100}.get(self.name)
        if spec is None or self.download:
            return self
        if not root.is_dir():
            raise ValueError(f"{where}: {str(root)!r} does not exist (or set data.download: true)")
        files = spec.train_files + spec.test_files
        if not any(all((folder / f).is_file() for f in files) for folder in (root, root / spec.folder)):
            raise ValueError(f"{where}: {str(root)!r} holds no complete {spec.folder} "
                             "(or set data.download: true)")
        return self


class TrainSection(TrainSpec):
    """Dense training, or ``checkpoint:`` a saved model directory to start from instead.

    ``rewind_points``: epochs after which the weights are saved (``train/rewind/``) for weight
    rewinding later; a ``retrain`` with ``lr_plan: weight_rewind`` adds the epoch it needs itself.
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
        others = sorted(self.model_fields_set - {"checkpoint"})
        if others:
            raise ValueError(f"checkpoint: skips dense training, so it cannot be combined with "
                             f"{', '.join(others)}")
        spec = Path(self.checkpoint) / "model.json"
        if not spec.is_file():
            raise ValueError(f"checkpoint: {self.checkpoint!r} has no model.json (expected a directory "
                             "written by prunekit train or a run's train/ stage)")
        try:
            saved = json.loads(spec.read_text())
        except ValueError:
            raise ValueError(f"checkpoint: {str(spec)!r} is not valid JSON") from None
        if saved.get("manifest"):
            raise ValueError(f"checkpoint: {self.checkpoint!r} is already compacted; start from its dense model")
        return self


class EvaluateSection(Section):
    precision: Literal["fp32", "bf16"] = "fp32"
    latency: bool = False
    latency_batch_size: PositiveInt = 32


class ExportSection(Section):
    onnx: bool = False

    @field_validator("onnx")
    @classmethod
    def _installed(cls, onnx: bool) -> bool:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if onnx and missing:
            raise ValueError(f"needs {', '.join(missing)}; pip install 'prunekit[onnx]'")
        return onnx


class Recipe(Section):
    """A whole experiment. Sections run as stages: train → prune → retrain → compact → evaluate → export."""

    name: str
    model: ModelSection
    data: DataSection
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0])
    device: str = "auto"
    train: TrainSection | None = None
    prune: SerializeAsAny[PruneSpec] | None = None
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
            if seeds < 1:
                raise ValueError(f"expected a number of seeds >= 1 or a list of seeds, got {seeds!r}")
            return list(range(seeds))
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
        if not isinstance(value, dict):
            return value
        if "method" not in value:
            raise ValueError(f"method: required key is missing; known: {', '.join(PRUNE_METHODS.names())}")
        method = value["method"]
        if not isinstance(method, str) or method not in PRUNE_METHODS:
            raise ValueError(f"method: unknown pruning method {method!r}; known: {', '.join(PRUNE_METHODS.names())}")
        return PRUNE_METHODS.get(method).model_validate(value)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.retrain is not None and self.prune is None:
            raise ValueError("retrain: needs a prune section (retraining fine-tunes the pruned model)")
        if self.train is not None and self.train.checkpoint:
            saved = json.loads((Path(self.train.checkpoint) / "model.json").read_text())
            if saved.get("model") != self.model.name:
                raise ValueError(f"train.checkpoint: holds a {saved.get('model')!r} model, but model.name is "
                                 f"{self.model.name!r}")
        if self.retrain is not None and self.retrain.lr_plan in ("lr_rewind", "weight_rewind"):
            self._check_rewinding()
        return self

    def _check_rewinding(self) -> None:
        """A rewinding plan replays the original run: its T must be the dense training's, and
        weight rewinding needs the weights saved after epoch T − t."""
        from prunekit.methods.retraining import REWIND_DIR, rewind_point_path

        retrain, train = self.retrain, self.train
        original = retrain.lr_plan_args.get("original_epochs")
        if train is not None and not train.checkpoint and original != train.epochs:
            raise ValueError(f"retrain.lr_plan_args.original_epochs: expected {train.epochs} (train.epochs: the "
                             f"original run it replays), got {original!r}")
        if retrain.lr_plan != "weight_rewind":
            return
        if train is None:
            raise ValueError("retrain.lr_plan: weight_rewind needs the original training (a train section, or "
                             "train.checkpoint with its rewind/ points)")
        if train.checkpoint:
            point = rewind_point_path(Path(train.checkpoint) / REWIND_DIR, original - retrain.epochs)
            if not point.is_file():
                raise ValueError(f"retrain.lr_plan: weight_rewind with epochs={retrain.epochs} needs the weights "
                                 f"after original epoch {original - retrain.epochs}, but {str(point)!r} does not "
                                 "exist (train with train.rewind_points to keep them)")

    def rewind_epoch(self) -> int | None:
        """The original epoch a ``weight_rewind`` retraining restarts from (None: it does not rewind)."""
        if self.retrain is None or self.retrain.lr_plan != "weight_rewind":
            return None
        return self.retrain.lr_plan_args["original_epochs"] - self.retrain.epochs

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

    def rewind_epochs(self) -> list[int]:
        """Original epochs whose weights the train stage saves: ``train.rewind_points`` plus T − t
        when ``retrain`` rewinds weights (t its epochs, T the dense training's)."""
        if self.train is None or self.train.checkpoint:
            return []
        epochs = set(self.train.rewind_points)
        if self.rewind_epoch() is not None:
            epochs.add(self.rewind_epoch())
        return sorted(epochs)

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
                problems.append(Problem(".".join(path[: depth + 1]), f"is {child!r}, not a section; cannot set {key}"))
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
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_problem(error, raw) for error in exc.errors()]
        raise RecipeError(_dedupe(problems)) from None


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
            cls = PRUNE_METHODS.get(method) if method in PRUNE_METHODS else PruneSpec
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
