"""Model transforms that survive saving: swapped or added layers, recorded on the model.

A transform is a registered function ``fn(model, **args) -> model`` that changes a model's
structure (swap convs for hyperspherical ones, insert channel gates, change a residual form)
without editing its code. :func:`apply_transform` runs one and records ``{"name", "args"}``
on the model; the model format writes the record list into ``model.json`` and, on load,
rebuilds the architecture and replays the same transforms before loading the weights, so a
transformed model reloads identically with no pickles. Arguments must be JSON values.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from prunekit.errors import UserError
from prunekit.registry import Registry

log = logging.getLogger(__name__)

Transform = Callable[..., nn.Module]
TRANSFORMS: Registry[Transform] = Registry("model transform")
RECORD = "prunekit_transforms"
"""Attribute of the root module holding the applied transforms, in order."""
BUILTIN = ("prunekit.core.hyperspherical", "prunekit.core.gates", "prunekit.core.scatter")
"""Core modules that register transforms; imported on first replay. A transform registered
elsewhere needs its module imported before a model using it is loaded."""


def register_transform(name: str) -> Callable[[Transform], Transform]:
    """Decorator: register ``fn(model, **args) -> model`` under ``name``."""
    return TRANSFORMS.register(name)


def apply_transform(model: nn.Module, name: str, **args: Any) -> nn.Module:
    """Run transform ``name`` on ``model`` and record it; returns the (possibly new) root module."""
    try:
        json.dumps(args)
    except TypeError as exc:
        raise UserError(f"transform {name!r}: arguments must be JSON values ({exc})") from None
    history = recorded(model)
    result = TRANSFORMS.get(name)(model, **args)
    setattr(result, RECORD, [*history, {"name": name, "args": args}])
    log.debug("applied transform %s %s", name, args)
    return result


def recorded(model: nn.Module) -> list[dict[str, Any]]:
    """The transforms applied to ``model`` so far (JSON-ready), oldest first."""
    return [dict(entry) for entry in getattr(model, RECORD, [])]


def replay(model: nn.Module, records: Sequence[dict[str, Any]]) -> nn.Module:
    """Apply saved transform records to a freshly built model, in order."""
    if records:
        for module in BUILTIN:
            importlib.import_module(module)
    for entry in records:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("args", {}), dict):
            raise UserError(f"transforms: expected entries like {{'name': ..., 'args': {{...}}}}, got {entry!r}")
        model = apply_transform(model, entry["name"], **entry.get("args", {}))
    return model

