"""Argument types for argparse: each rejects bad input with a message naming what was expected."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _float(text: str) -> float:
    """``float(text)`` for ASCII finite numbers, else NaN (``float`` also takes '٠.٥' and 'inf')."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= ``minimum``."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text) if text.isascii() else minimum - 1
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number(text: str) -> float:
    value = _float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A fraction in [0, 1); percent-style values such as 90 are refused, not guessed."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


MAX_INPUT_VALUES = 2**24
"""Largest C*H*W an input shape may have (3x2048x2048 fits): one float32 sample of 64 MiB."""


def input_shape(text: str) -> tuple[int, int, int]:
    """``3x32x32`` -> (3, 32, 32): channels x height x width, positive, at most MAX_INPUT_VALUES."""
    parts = text.lower().split("x")
    dims = tuple(int(p) for p in parts if p.isascii() and p.isdigit())
    if len(parts) != 3 or len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32 (channels x height x width, "
                                         f"three positive integers), got {text!r}")
    values = dims[0] * dims[1] * dims[2]
    if values > MAX_INPUT_VALUES:
        raise argparse.ArgumentTypeError(f"expected CxHxW with C*H*W at most {MAX_INPUT_VALUES:,} "
                                         f"(3x2048x2048 fits), got {text!r} ({values:,} values)")
    return dims
