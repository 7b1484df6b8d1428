"""A model on disk without pickles: ``model.json`` (how to rebuild it) + ``model.safetensors``.

The JSON names the registered architecture and its arguments, so a fresh process rebuilds
the module and loads the tensors. A compacted model also carries the manifest of its kept
channels (:mod:`prunekit.core.manifest`): the dense architecture is built, the same channels
removed, then the weights loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from prunekit.core.manifest import Manifest, apply_manifest
from prunekit.errors import UserError
from prunekit.io import atomic_path, write_json
from prunekit.models import build_model

SPEC_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"


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


def save_artifact(model: nn.Module, spec: ModelSpec, directory: str | Path,
                  manifest: Manifest | None = None) -> Path:
    """Write ``model.safetensors`` then ``model.json`` (the JSON last: its presence marks completeness).

    Pass the ``manifest`` of a compacted model (it goes into ``model.json``).
    """
    directory = Path(directory)
    if manifest is not None:
        spec = replace(spec, manifest=manifest.to_dict())
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), force_contiguous=True)
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
    model = build_model(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if spec.manifest is not None:
        apply_manifest(model, Manifest.from_dict(spec.manifest), torch.zeros(1, *spec.input_shape))
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"model: cannot read {str(directory / WEIGHTS_NAME)!r} ({exc})") from None
    if missing or unexpected:
        raise UserError(f"model: weights in {str(directory)!r} do not fit {spec.model!r} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return model, spec
