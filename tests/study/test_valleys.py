"""Where each family's optimum sits, against a law with a known optimum: the valleys bracket it
where the sizes straddle it, say at which edge the best sits where they do not, and the slope of
N_opt against compute comes back as the law's (beta / (alpha + beta) for Hoffmann's form)."""

from types import SimpleNamespace

import numpy as np
import pytest

from vitscale.study import report_checks, valleys
from vitscale.study.fits import Law
from vitscale.study.results import Point, SeedResult, TrialResult
from vitscale.study.summary import Noise

N0, D0 = 1e6, 1e4
# error = e + a x^-0.5 + b (D/d0)^-0.5 with x = N/n0 and D = C / (3 N):
# the optimum x* = (a/b) sqrt(C / (3 n0 d0))
LAW = Law(("w",), 0.05, 0.1, (0.5,), 0.1 / 0.6, 0.5, 0.0, N0, D0, 0.0, 0)
TOP = 3 * N0 * D0 / 0.36  # where x* = 1
FRACTIONS = (1 / 16, 1 / 4, 1.0)  # x* = 1/4, 1/2, 1: each on a size measured
QUIET = Noise(0.002, 4, 0.002)


def _trial(factor: float, compute: float = TOP, law: Law = LAW) -> TrialResult:
    n = N0 * factor
    per_sample = 3 * n
    samples = compute / per_sample
    points = tuple(
        Point(f, round(f * samples), round(f * samples), f * compute, 1.0,
              1 - float(law.predict("w", n, f * samples)), None, 0.004, True)
        for f in FRACTIONS
    )
    name = "base" if factor == 1 else f"w-x{factor:g}"
    return TrialResult(name, ("w",), factor, factor, {}, 0, n, 0.0, 1, 4e-3, round(samples), per_sample, {},
                       10000, (SeedResult(name, 0, points, (), 1.0, 1.0),))


def test_valleys_bracket_the_known_optimum_and_its_slope_with_compute():
    rows = [_trial(2.0**k) for k in range(-4, 3)]
    vs = valleys.valleys(rows, ("w",), QUIET)
    # the annealed points' computes, and powers of two of the base's between them (interpolated)
    assert [v.compute / TOP for v in vs] == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2, 1], rel=1e-5)
    for v in vs:
        assert v.bracketed and v.edge == ""
        truth = N0 * np.sqrt(v.compute / TOP)  # x* ~ sqrt(C)
        exact = any(v.compute == pytest.approx(f * TOP) for f in FRACTIONS)
        assert v.optimum == pytest.approx(truth, rel=0.01 if exact else 0.1)
    (g,) = valleys.scaling(vs, (), ("w",))
    assert g.valleys == 5
    assert g.slope == pytest.approx(0.5, abs=0.02)
    assert g.interval[0] < 0.5 < g.interval[1]
    assert g.law_slope is None and g.note == ""
    assert valleys.unbracketed(vs) == []


def test_a_valley_whose_best_is_the_smallest_size_is_not_bracketed_and_says_so():
    rows = [_trial(f) for f in (2, 4, 8)]  # every size above the optimum: the smallest wins
    vs = valleys.valleys(rows, ("w",), QUIET)
    assert vs and all(not v.bracketed and v.edge == "smallest" and v.optimum is None for v in vs)
    (top,) = valleys.unbracketed(vs)
    assert top.compute == pytest.approx(TOP) and top.best == "w-x2"
    (g,) = valleys.scaling(vs, (), ("w",))
    assert g.slope is None and "0 of its 5" in g.note
    first = report_checks.not_bracketed(SimpleNamespace(valleys=vs))
    assert first and "not bracketed" in first[0] and "smallest" in first[0]


def test_a_best_within_noise_of_a_neighbour_is_not_resolved():
    rows = [_trial(f) for f in (0.5, 1, 2)]  # a flat valley: the neighbours are close to the best
    v = valleys._valley("w", TOP, rows, sd=0.05)
    assert v is not None and not v.bracketed and v.edge == "within noise"
    assert valleys._valley("w", TOP, rows[:2], sd=0.0) is None  # two sizes make no valley


def test_the_law_slope_is_compared_and_a_disagreement_is_named():
    rows = [_trial(2.0**k) for k in range(-4, 3)]
    vs = valleys.valleys(rows, ("w",), QUIET)
    flat = tuple(SimpleNamespace(strategy="w", compute=c, flops=N0) for c in np.geomspace(TOP / 16, TOP, 6))
    (g,) = valleys.scaling(vs, flat, ("w",))
    assert g.law_slope == pytest.approx(0.0, abs=1e-9)
    assert "outside the valleys' interval" in g.note
