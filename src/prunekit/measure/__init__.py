"""Measurements of a model: MACs (thop convention) and parameter counts."""

from prunekit.measure.macs import MacReport, MacRow, count_macs
from prunekit.measure.params import count_params

__all__ = ["MacReport", "MacRow", "count_macs", "count_params"]
