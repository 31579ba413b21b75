"""benchmarks/bench_efficiency.py (issue 12): the multi-side run's length matches the single-side
run's compute (checked against a brute-force search), unknown sections are refused, and each
section runs end to end in --quick mode (slow) with the figures it must hold by construction."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_efficiency as be  # noqa: E402

from vitscale.data.multires import side_at  # noqa: E402


@pytest.mark.parametrize("budget", [1.0, 7.0, 20.0, 20.5, 101.0])
def test_matched_steps_is_the_nearest_total(budget):
    sides, seed, per_side = (24, 32, 40), 3, {24: 1.0, 32: 2.0, 40: 4.5}
    totals = [0.0]
    for s in range(200):
        totals.append(totals[-1] + per_side[side_at(sides, seed, s)])
    best = min(range(len(totals)), key=lambda m: (abs(totals[m] - budget), m))
    steps = be.matched_steps(sides, seed, per_side, budget)
    assert abs(totals[steps] - budget) == abs(totals[best] - budget)
    assert be.multires_compute(sides, seed, per_side, steps) == pytest.approx(totals[steps])


def test_unknown_sections_are_refused():
    assert be.sections("drop,multires") == ["drop", "multires"]
    with pytest.raises(SystemExit, match="multires,s2,drop"):
        be.sections("multires,speed")


@pytest.mark.slow
@pytest.mark.parametrize("section", list(be.SECTIONS))
def test_quick_section_runs(section, tmp_path, capsys):
    out = be.main(["--quick", "--threads", "1", "--device", "cpu", "--only", section, "--out", str(tmp_path),
                   "--json", str(tmp_path / "out.json")])[section]
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())[section] == json.loads(json.dumps(out))
    if section == "multires":
        assert [r["side"] for r in out["rows"]] == [16, 24, 32, 40, 48]
        assert printed.count("  test side ") == 5
        biggest_step = 64 * be.flops_at(be.config.recipe("train"), 40)  # batch 64 at the largest side
        assert abs(out["multi_flops"] - out["single_flops"]) <= biggest_step
        with Image.open(out["plot"]) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
    elif section == "s2":
        flops = [r["flops"] for r in out["rows"]]
        assert flops[1] / flops[0] == pytest.approx(5, rel=0.01)  # the image and its 4 tiles: 5 forwards
        assert flops[2] == pytest.approx(flops[1], rel=0.15)  # the wider encoder: about the same cost
    elif section == "multigrid":
        assert [r["label"] for r in out["rows"]] == ["plain", "multigrid x1.5", "multigrid x3"]
        plain = out["rows"][0]  # 3 steps of 16 clips of 8 frames x 16 px
        assert plain["reached"] is not None and plain["steps"] == 3
        cfg = be.config.apply_overrides(be.config.recipe("train"), be.VIDEO)
        per_clip = be.train_flops_per_sample(replace(cfg, model=cfg.model.replace(image_size=16)), 8)
        assert plain["flops"] == pytest.approx(3 * 16 * per_clip)
        assert printed.count("multiply-adds (") == 3
    else:
        speed = {c["label"]: c for c in out["speed"]}
        assert speed["keep 1.0"]["gflops"] == speed["plain"]["gflops"]
        assert [c["tokens_after"] for c in out["speed"]] == [65, 65, 1 + round(0.7 * 64), 33]
        assert [c["keep"] for c in out["finetune"]] == [1.0, 0.7, 0.5]
        assert out["finetune"][2]["flops"] < out["finetune"][1]["flops"] < out["finetune"][0]["flops"]
