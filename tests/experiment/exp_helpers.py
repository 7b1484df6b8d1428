"""Shared helpers of the experiment tests (a plain module: a second conftest.py would clash)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from prunekit.train.hooks import Hook

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


class Crash(Hook):
    """Raise in the middle of epoch ``epoch`` (0-based) of the stage it is attached to."""

    def __init__(self, epoch: int, step_in_epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, step_in_epoch

    def on_step_begin(self, trainer) -> None:
        if trainer.global_step == self.epoch * trainer.steps_per_epoch + self.step_in_epoch:
            raise RuntimeError("simulated crash mid-epoch")
