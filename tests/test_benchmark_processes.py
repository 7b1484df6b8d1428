"""The benchmarks' process pool: every job runs, a free slot is refilled at once, a failure stops it."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from processes import run_processes  # noqa: E402


def job(seconds: float, marker: Path) -> list[str]:
    code = f"import time, pathlib; time.sleep({seconds}); pathlib.Path({str(marker)!r}).write_text(str(time.time()))"
    return [sys.executable, "-c", code]


def test_every_job_runs_and_a_free_slot_is_refilled_before_the_first_job_ends(tmp_path):
    long, short, after = tmp_path / "long", tmp_path / "short", tmp_path / "after"
    run_processes([job(3.0, long), job(0.2, short), job(0.2, after)], parallel=2, poll_s=0.05)
    assert all(p.is_file() for p in (long, short, after))
    assert float(after.read_text()) < float(long.read_text())  # did not wait for the first job


def test_a_failing_job_stops_the_pool_and_names_its_command(tmp_path):
    began = time.monotonic()
    with pytest.raises(SystemExit, match=r"job failed: .*SystemExit\(3\)"):
        run_processes([[sys.executable, "-c", "raise SystemExit(3)"], job(30.0, tmp_path / "slow"),
                       job(0.0, tmp_path / "never")], parallel=2, poll_s=0.05)
    assert time.monotonic() - began < 20  # the other job was stopped, not waited for
    assert not (tmp_path / "never").exists()
