"""The study's typed results: written, read back, refused when stale, averaged over seeds."""

import json
import math
from dataclasses import replace

import pytest

from vitscale.study import results
from vitscale.study.results import Point, SeedResult, StaleResult, TrialResult


def _law(n, d):
    return 0.04 + 0.3 * (n / 1e6) ** -0.5 + 0.4 * (d / 1e4) ** -0.35


def _trial(name: str, flops: float, steps: int, accuracy=None, seeds=(0,), batch=10) -> TrialResult:
    """A trial whose annealed points follow `_law` exactly (or a given final accuracy)."""
    per_sample = 3 * flops
    out = []
    for seed in seeds:
        points = []
        for f in (0.125, 0.25, 0.5, 1.0):
            s = round(f * steps)
            acc = 1 - _law(flops, s * batch)
            if f == 1.0 and accuracy is not None:
                acc = accuracy
            points.append(Point(f, s, s * batch, s * batch * per_sample, s / 100, acc, 1 - acc, 0.004, True))
        out.append(SeedResult(name, seed, tuple(points), (replace(points[1], annealed=False),),
                              10.0, 1000.0))
    return TrialResult(name, ("w",), flops / 1e6, flops / 1e6, {"depth": 4, "width": 64}, 100, flops,
                       10 * flops, batch, 4e-3, steps, per_sample,
                       {"samples_per_s": 1000.0, "peak_mem_mb": 1.0}, 10000, tuple(out))


def test_results_round_trip_through_json(tmp_path):
    t = _trial("w-x2", 2e6, 800, seeds=(0, 1))
    results.write(tmp_path / "r.json", t)
    back = results.read(tmp_path / "r.json", TrialResult)
    assert back == t
    assert back.seeds[1].points[2].accuracy == t.seeds[1].points[2].accuracy
    assert back.accuracy == pytest.approx(t.accuracy)


def test_a_result_of_another_version_or_kind_is_refused_not_misread(tmp_path):
    t = _trial("base", 1e6, 800)
    path = tmp_path / "r.json"
    data = results.to_dict(t)
    path.write_text(json.dumps(data | {"version": results.VERSION - 1}))
    with pytest.raises(StaleResult, match="version"):
        results.read(path, TrialResult)
    path.write_text(json.dumps(data))
    with pytest.raises(StaleResult, match="SeedResult"):
        results.read(path, SeedResult)
    path.write_text('{"name": "base", "accuracy": 0.9}')  # the first study's untyped row
    with pytest.raises(StaleResult):
        results.read(path, TrialResult)
    path.write_text("{not json")
    with pytest.raises(StaleResult, match="JSON"):
        results.read(path, TrialResult)


def test_seeds_average_and_the_binomial_error_pools_them():
    t = _trial("base", 1e6, 800, accuracy=0.8, seeds=(0,))
    two = replace(t, seeds=(t.seeds[0], _trial("base", 1e6, 800, accuracy=0.7).seeds[0]))
    assert two.accuracies == [0.8, 0.7] and two.accuracy == pytest.approx(0.75)
    assert two.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 20000))
    assert t.stderr == pytest.approx(math.sqrt(0.8 * 0.2 / 10000))
    assert [p.accuracy for p in two.points()][-1] == pytest.approx(0.75)
