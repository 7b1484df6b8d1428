"""Shared helpers of the experiment tests (a plain module: a second conftest.py would clash)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"name": "small_cnn"},
    "data": {"name": "digits", "batch_size": 64},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 3.0e-3, "weight_decay": 1.0e-4, "precision": "fp32"},
    "prune": {"method": "oneshot", "target": "weights=0.5"},
    "retrain": {"epochs": 3, "optimizer": "adamw", "lr": 1.0e-3, "lr_plan": "cosine", "precision": "fp32"},
}


def recipe(base: dict[str, Any] = TINY, **sections: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with whole sections replaced (None removes a section)."""
    out = copy.deepcopy(base)
    for key, value in sections.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def write_recipe(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path
