"""Keys shared by the methods that prune to a target with a criterion (one-shot, gradual)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.core.granularity import NM, get_granularity
from prunekit.core.importance import CRITERIA
from prunekit.core.targets import Target, parse_target
from prunekit.errors import UserError
from prunekit.methods.base import Method
from prunekit.schema import PositiveInt, reword

DATA_FREE_CRITERIA = ("l1", "l2", "random")
"""Criteria that need no data evidence; taylor/movement/bn_scale need a method that gathers it."""

UNIT_GRANULARITY = {"weights": "weight", "filters": "filter", "macs": "filter"}


class TargetedMethod(Method):
    """``target`` names its unit; the number is the fraction removed. Filter granularity picks the
    removable channel groups itself; ``layers``/``include_*`` choose the layers of the others."""

    target: str
    granularity: str | None = None
    criterion: str = "l1"
    scope: Literal["local", "global"] = "local"
    layers: list[str] = Field(default_factory=lambda: ["*"])
    include_first_conv: bool = True
    include_classifier: bool = False
    round_to: PositiveInt | None = None

    @field_validator("target", mode="before")
    @classmethod
    def _parse_target(cls, value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = f"{value / 100:g}" if 1 < value <= 100 else f"{value:g}"
            raise ValueError(f"needs a unit: write weights={hint}, filters={hint} or macs={hint} "
                             "(the fraction removed)")
        try:
            target = parse_target(value)
        except UserError as exc:
            raise ValueError(reword(str(exc), "target")) from None
        if not 0 < target.fraction < 1:
            what = "removes nothing" if target.fraction == 0 else f"would remove all {target.unit}"
            raise ValueError(f"{target} {what}; expected a fraction removed in (0, 1)")
        return str(target)

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, name: str) -> str:
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA.names())}")
        if name not in DATA_FREE_CRITERIA:
            raise ValueError(f"{name} needs data evidence, which this method does not gather; "
                             f"use {', '.join(DATA_FREE_CRITERIA)}")
        return name

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, patterns: list[str]) -> list[str]:
        if not patterns:
            raise ValueError("expected at least one glob such as '*' (prefix with ! to exclude)")
        return patterns

    @model_validator(mode="after")
    def _granularity_fits_target(self) -> TargetedMethod:
        target = self.parsed_target
        if self.granularity is None:
            self.granularity = UNIT_GRANULARITY[target.unit]
        try:
            granularity = get_granularity(self.granularity)
        except UserError as exc:
            raise ValueError(f"granularity: {reword(str(exc), 'granularity')}") from None
        self.granularity = granularity.name
        if granularity.name == "channel":
            raise ValueError("granularity: channel pruning selects input channels, which compaction "
                             "cannot remove (it removes filters); use filter")
        if target.unit == "weights" and granularity.structured:
            raise ValueError(f"target: {target} does not fit granularity {granularity}, which removes whole "
                             f"{granularity.name}s; write filters=… (or macs=…)")
        if target.unit in ("filters", "macs") and not granularity.structured:
            raise ValueError(f"target: {target} needs granularity filter; granularity {granularity} prunes "
                             "single weights, write weights=…")
        if isinstance(granularity, NM) and abs(target.fraction - granularity.sparsity) > 1e-9:
            raise ValueError(f"target: granularity {granularity} fixes the sparsity at {granularity.sparsity:g}; "
                             f"write weights={granularity.sparsity:g}")
        if self.round_to is not None and not granularity.structured:
            raise ValueError("round_to: applies to filter pruning only (kept filters per layer a multiple of N)")
        if granularity.structured and (self.layers != ["*"] or not self.include_first_conv or self.include_classifier):
            raise ValueError("layers: filter pruning picks the removable channel groups itself (classifier "
                             "outputs excluded); layers / include_first_conv / include_classifier apply to "
                             "weight, kernel and N:M granularity")
        return self

    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target)

    @property
    def structured(self) -> bool:
        return get_granularity(self.granularity).structured

    def layer_choice(self) -> dict[str, Any]:
        """The Sparsifier's layer arguments for weight, kernel and N:M granularity."""
        return {"layers": self.layers, "include_first_conv": self.include_first_conv,
                "include_classifier": self.include_classifier}
