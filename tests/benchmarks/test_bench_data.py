"""benchmarks/bench_data.py runs end to end and prints its ratio lines (small sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _half_unit(text: str) -> float:
    """Half a unit of the last digit printed: how far a rounded figure may be from its value."""
    return 0.5 * 10 ** -(len(text.partition(".")[2]))


def _agrees(ours: str, theirs: str, ratio: str) -> bool:
    """The printed ratio is ours / theirs, within what rounding the three printed figures allows
    (slow rates print few digits: 3.3 vs 2.0 = 1.6 is 3.26 / 2.04)."""
    o, t, r = float(ours), float(theirs), float(ratio)
    lo = (o - _half_unit(ours)) / (t + _half_unit(theirs))
    hi = (o + _half_unit(ours)) / max(t - _half_unit(theirs), 1e-12)
    return lo - _half_unit(ratio) <= r <= hi + _half_unit(ratio)


def test_the_ratio_check_allows_rounding_and_nothing_more():
    assert _agrees("3.3", "2.0", "1.6") and _agrees("120.5", "60.2", "2.00")
    assert not _agrees("3.3", "2.0", "1.9") and not _agrees("120.5", "60.2", "2.10")


@pytest.mark.slow
def test_the_cluttered_part_prints_its_rates():
    out = run("--only", "cluttered", "--samples", "2000", "--sizes", "16")
    assert "2,000 samples rendered" in out and "256 B each" in out and "samples/s vs digits" in out


@pytest.mark.slow
def test_the_video_part_prints_the_loader_against_plain_decoding_and_data_wait():
    # 4 videos: the epoch-start check's batch of 4 needs an epoch of 4 clips
    out = run("--only", "video", "--videos", "4", "--seconds", "4", "--clips", "2", "--steps", "2")
    for workers in (0, 2):
        m = re.search(rf"video loader \(workers {workers}, decode threads \d+\) vs plain PyAV decode: "
                      r"([\d.]+) vs ([\d.]+) clips/s = ([\d.]+)x", out)
        assert m, out
        assert _agrees(*m.groups()), m[0]
    assert re.search(r"first batch after [\d.]+ s from the run's one loader vs [\d.]+ s from a new loader "
                     "each epoch", out), out
    assert re.search(r"data-wait share: workers 0 \d+% \([\d.]+ samples/s\), workers 2 \d+%", out), out
    assert re.search(r"data-wait share by epoch: workers 0 \d+% \d+%; workers 2 \d+% \d+%", out), out
