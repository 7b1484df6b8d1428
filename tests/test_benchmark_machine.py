"""The precision line of the experiment summaries names every run's training precision; the
machine record names the CPU features that set the training speed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from machine import cpu_model_and_flags, precision_line  # noqa: E402


def test_by_seed_with_rows_from_before_the_field():
    rows = [{"seed": 0}, {"seed": 2, "precision": "bf16"}, {"seed": 1, "precision": "bf16"}]
    assert precision_line(rows) == "Training precision: bf16 (seeds 1, 2); not recorded (seed 0)."


def test_by_arm_and_seed():
    rows = [{"arm": "A", "seed": 0, "precision": "fp32"}, {"arm": "B", "seed": 0, "precision": "fp32"},
            {"arm": "A", "seed": 1, "precision": "bf16"}, {"arm": "C", "seed": 1, "precision": "bf16"},
            {"arm": "C", "seed": 0, "precision": "bf16"}]
    assert precision_line(rows, arm=lambda row: row["arm"]) == (
        "Training precision: bf16 (seeds 0, 1 of C and seed 1 of A); fp32 (seed 0 of A, B).")


def test_by_seed_when_every_seed_has_one_precision():
    rows = [{"arm": "A", "seed": 0, "precision": "fp32"}, {"arm": "B", "seed": 0, "precision": "fp32"},
            {"arm": "A", "seed": 1, "precision": "bf16"}, {"arm": "B", "seed": 1}]
    assert precision_line(rows[:3], arm=lambda row: row["arm"]) == "Training precision: bf16 (seed 1); fp32 (seed 0)."
    assert precision_line(rows, arm=lambda row: row["arm"]) == (
        "Training precision: bf16 (seed 1 of A); fp32 (seed 0 of A, B); not recorded (seed 1 of B).")


def test_cpu_model_and_the_matmul_flags_it_has():
    cpuinfo = ("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
               "\nprocessor\t: 1\nmodel name\t: Some Xeon\n")
    assert cpu_model_and_flags(cpuinfo) == ("Some Xeon", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"])
    assert cpu_model_and_flags("flags : sse2 avx2\n") == (None, ["avx2"])
