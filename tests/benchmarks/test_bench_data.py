"""benchmarks/bench_data.py runs end to end and prints its ratio lines (small sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_the_cluttered_part_prints_its_rates():
    out = run("--only", "cluttered", "--samples", "2000", "--sizes", "16")
    assert "2,000 samples rendered" in out and "256 B each" in out and "samples/s vs digits" in out


@pytest.mark.slow
def test_the_video_part_prints_the_loader_against_plain_decoding_and_data_wait():
    out = run("--only", "video", "--videos", "4", "--clips", "4", "--steps", "2")
    for workers in (0, 2):
        m = re.search(rf"video loader \(workers {workers}, decode threads \d+\) vs plain PyAV decode: "
                      r"([\d.]+) vs ([\d.]+) clips/s = ([\d.]+)x", out)
        assert m, out
        ours, theirs, ratio = map(float, m.groups())
        assert ratio == pytest.approx(ours / theirs, rel=0.03)  # (the rates are printed rounded)
    assert re.search(r"first batch after [\d.]+ s from the run's one loader vs [\d.]+ s from a new loader "
                     "each epoch", out), out
    assert re.search(r"data-wait share: workers 0 \d+% \([\d.]+ samples/s\), workers 2 \d+%", out), out
    assert re.search(r"data-wait share by epoch: workers 0 \d+% \d+%; workers 2 \d+% \d+%", out), out
