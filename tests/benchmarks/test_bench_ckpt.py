"""benchmarks/bench_ckpt.py runs on 2 gloo ranks and prints what each rank holds to checkpoint."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import ranks

from vitscale.models.presets import preset
from vitscale.models.vit import ViT

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ckpt.py"


@pytest.mark.slow
def test_a_sharded_checkpoint_holds_half_the_state_on_each_of_two_ranks(tmp_path, capsys, monkeypatch):
    argv = [str(BENCH), "--model", "mu/4", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)  # rank 0's, read by the script in this process

    def rank_0() -> None:
        runpy.run_path(str(BENCH), run_name="__main__")

    said = ranks.here_and_apart(rank_0, [sys.executable, *argv], capsys)
    line = r"on 2 ranks, (sharded|full) checkpoint: rank (\d) holds ([\d.]+) MiB"
    held = {(kind, int(rank)): float(mib) for kind, rank, mib in re.findall(line, said)}
    assert len(held) == 4, said
    # float32 weights and AdamW's two moments (3 x 4 bytes a weight; its step counts are scalars),
    # whole on rank 0 alone, or split between the ranks
    whole = sum(p.numel() for p in ViT(preset("mu/4")).parameters()) * 12 / 2**20
    assert held["full", 0] == pytest.approx(whole, rel=0.01) and held["full", 1] == 0
    assert held["sharded", 0] + held["sharded", 1] == pytest.approx(whole, rel=0.01)
    assert max(held["sharded", 0], held["sharded", 1]) < 0.6 * whole
    assert (tmp_path / "sharded" / "ckpt-00000001" / "shards" / ".metadata").is_file()
