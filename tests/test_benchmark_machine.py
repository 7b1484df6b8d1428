"""The precision line of the experiment summaries names every run's training precision."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine import precision_line  # noqa: E402


def test_by_seed_with_rows_from_before_the_field():
    rows = [{"seed": 0}, {"seed": 2, "precision": "bf16"}, {"seed": 1, "precision": "bf16"}]
    assert precision_line(rows) == "Training precision: bf16 (seeds 1, 2); not recorded (seed 0)."


def test_by_arm_and_seed():
    rows = [{"arm": "A", "seed": 0, "precision": "fp32"}, {"arm": "B", "seed": 0, "precision": "fp32"},
            {"arm": "A", "seed": 1, "precision": "bf16"}, {"arm": "C", "seed": 1, "precision": "bf16"},
            {"arm": "C", "seed": 0, "precision": "bf16"}]
    assert precision_line(rows, arm_key="arm") == "Training precision: bf16 (A seed 1, C seeds 0, 1); fp32 (A seed 0, B seed 0)."
