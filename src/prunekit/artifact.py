"""The one model format, without pickles: ``model.json`` (how to rebuild it) + ``model.safetensors``.

The JSON names the registered architecture and its arguments, the model transforms applied to
it (:mod:`prunekit.core.transforms`: swapped or added layers, replayed in order) and, for a
compacted model, the manifest of its kept channels (:mod:`prunekit.core.manifest`): loading
builds the architecture, replays the transforms, removes the same channels, then loads the
weights. A masked model (zeros in place) also has ``masks.safetensors``
(:mod:`prunekit.core.masks`), named with its granularity in the JSON; :func:`load_masks` puts
the masks back on the loaded model. Every writer (CLI or recipe stage) goes through
:func:`save_artifact`, every reader through :func:`load_artifact`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from prunekit.core.compaction import apply_manifest
from prunekit.core.manifest import Manifest
from prunekit.core.masks import MaskSet, read_masks
from prunekit.core.transforms import recorded, replay
from prunekit.errors import UserError
from prunekit.io import atomic_path, discards_writes, write_json
from prunekit.models import build_model

SPEC_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
MASKS_NAME = "masks.safetensors"


@dataclass
class ModelSpec:
    """Everything needed to rebuild the module before loading its weights."""

    model: str
    num_classes: int
    in_channels: int = 3
    input_shape: tuple[int, ...] = (3, 32, 32)
    data: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    """Kept channels of a compacted model (``Manifest.to_dict()``); None for a dense one."""
    transforms: list[dict[str, Any]] = field(default_factory=list)
    """Model transforms applied after building the architecture, in order."""
    masks: dict[str, Any] | None = None
    """``{"file": ..., "granularity": ...}`` of a masked model; None when it has no masks."""

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape)


def save_artifact(model: nn.Module, spec: ModelSpec, directory: str | Path, *,
                  manifest: Manifest | None = None, masks: MaskSet | None = None) -> Path:
    """Write the weights (+ ``masks``), then ``model.json`` (last: its presence marks completeness,
    so an older one is removed first and a kill mid-way never leaves new weights under an old spec).

    Pass the ``manifest`` of a model compacted here (it is composed with one the spec already
    has); the transforms recorded on ``model`` go into ``model.json``.
    """
    directory = Path(directory)
    model = model.to("cpu")
    if manifest is not None and spec.manifest is not None:
        manifest = Manifest.from_dict(spec.manifest).then(manifest)
    spec = replace(spec, transforms=recorded(model),
                   manifest=manifest.to_dict() if manifest is not None else spec.manifest,
                   masks={"file": MASKS_NAME, "granularity": masks.granularity.name} if masks else None)
    if not discards_writes():
        try:
            (directory / SPEC_NAME).unlink()
        except (FileNotFoundError, NotADirectoryError):  # nothing older; an unwritable --out fails just below
            pass
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), force_contiguous=True)
    if masks:
        masks.save(directory / MASKS_NAME)
    write_json(directory / SPEC_NAME, asdict(spec))
    return directory


def load_artifact(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from a directory written by :func:`save_artifact` (or its model.json)."""
    path = Path(path)
    directory = path.parent if path.name in (SPEC_NAME, WEIGHTS_NAME) else path
    spec_path = directory / SPEC_NAME
    if not spec_path.is_file():
        raise UserError(f"model: {str(path)!r} has no {SPEC_NAME}; expected a directory written by prunekit train")
    try:
        raw = json.loads(spec_path.read_text())
        spec = ModelSpec(**{**raw, "input_shape": tuple(raw["input_shape"])})
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"model: {str(spec_path)!r} is not a valid model spec ({exc})") from None
    _check_spec(spec, spec_path)
    model = replay(build_model(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels),
                   spec.transforms)
    if spec.manifest is not None:
        apply_manifest(model, Manifest.from_dict(spec.manifest), spec.example_input())
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"model: cannot read {str(directory / WEIGHTS_NAME)!r} ({exc})") from None
    if missing or unexpected:
        raise UserError(f"model: weights in {str(directory)!r} do not fit {spec.model!r} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return model, spec


MAX_CLASSES, MAX_CHANNELS, MAX_INPUT_ELEMENTS = 1_000_000, 4096, 3 * 4096 * 4096


def _check_spec(spec: ModelSpec, path: Path) -> None:
    """One line naming the field of a model.json whose numbers no model could have."""
    def whole(value: object, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    where = f"model: {str(path)!r}"
    if not whole(spec.num_classes, 1, MAX_CLASSES):
        raise UserError(f"{where}: num_classes expects an integer in [1, {MAX_CLASSES:,}], got {spec.num_classes!r}")
    if not whole(spec.in_channels, 1, MAX_CHANNELS):
        raise UserError(f"{where}: in_channels expects an integer in [1, {MAX_CHANNELS}], got {spec.in_channels!r}")
    shape = spec.input_shape
    if not shape or not all(whole(d, 1, MAX_INPUT_ELEMENTS) for d in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UserError(f"{where}: input_shape expects positive integers (at most {MAX_INPUT_ELEMENTS:,} elements), "
                        f"got {list(shape)!r}")
    if shape[0] != spec.in_channels:
        raise UserError(f"{where}: input_shape {list(shape)!r} starts with {shape[0]} channels, in_channels is "
                        f"{spec.in_channels}")


def load_masks(model: nn.Module, spec: ModelSpec, directory: str | Path) -> MaskSet | None:
    """The saved masks of a masked model, attached to ``model`` (loaded from ``directory``) and
    enforced; filter masks are coupled again. None for a model without masks."""
    if spec.masks is None:
        return None
    masks, granularity = read_masks(Path(directory) / spec.masks.get("file", MASKS_NAME))
    return MaskSet.attach(model, masks, granularity, spec.example_input())
