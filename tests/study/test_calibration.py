"""The backtest's intervals against studies simulated from a known law with the default study's
shape and noise: a LEVEL interval must cover about LEVEL of the held-out trials.

What an interval claims (summary.Check): the held-out trial's measured accuracy, the mean over its
seeds on the study's own test split, which is what `covered` counts and what anyone can check by
training it again on that split. That is what the test asserts; coverage of the true accuracy (the
law's value, no run's luck, no test sampling) is printed beside it.

The simulated world (`study`): the default study's seven trials (`vitscale study --plan`), each
annealed point off the law by
  - the test split's sampling: the binomial error of the point, of which a share RHO is one draw
    per study (every point is scored on the same items, and models trained on the same data miss
    largely the same hard ones) and the rest the point's own;
  - its seed's luck: one draw per seed, kept by all of that seed's cooldowns (a run's luck lasts);
seed 0 of every trial at every fraction, seed 1 (the full length only) of the leaders and the
held-out trials, as the runner does.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from vitscale.study import backtest, fits, lawfit
from vitscale.study.results import Point, SeedResult, TrialResult
from vitscale.study.summary import LEVEL, Noise
from vitscale.study.trials import held_out

# name, strategies, flops, steps: the default study's trials (its plan and results)
TRIALS = (
    ("d-x0.5", ("d",), 1815562, 4057),
    ("base", ("d", "w"), 3580298, 2048),
    ("d-x1.5", ("d",), 5345034, 1369),
    ("d-x2.25", ("d",), 7992138, 915),
    ("w-x0.5", ("w",), 2058538, 3579),
    ("w-x1.5", ("w",), 5519850, 1324),
    ("w-x2.25", ("w",), 7877194, 926),
)
BATCH, FRACTIONS, TEST, SEEDS, LEADERS, HOLDOUT = 32, (0.35, 0.5, 0.71, 1.0), 10_000, 2, 2, 1
# the default study's law, its parameters moved off their bounds (an e or an exponent at a bound is
# a fit's artefact, not a world): 84% at the base, 79-87% across the trials as measured
TRUE = fits.Law(("d", "w"), 0.03, 0.07, (0.3, 0.1), 0.485, 1.2, 0.185, 3580298.0, 10240.0, 0.0, 0)
LUCK = 0.0095  # seed-to-seed sd of the default study's final accuracies is about 1 point
RHO = 0.8  # share of a point's test sampling variance common to every point of the study
STUDIES = 200  # the floor: a coverage measured on fewer moves by more than its bounds allow for
# the noise-ignored twin: 20 studies covered 50-63% over seeds 1-5, far below the 80% it must fail
IGNORED_STUDIES = 20
REFITS = 20  # bootstrap refits per simulated study (the study's own: lawfit.BOOTSTRAP)


def study(rng: np.random.Generator, rho: float = RHO, luck: float = LUCK) -> tuple[list[TrialResult], dict]:
    """One simulated study's results and each trial's true final accuracy."""
    shared = rng.standard_normal()  # the test split's draw: every point is scored on it

    def measure(strategy: str, flops: float, samples: int, luck_: float) -> tuple[float, float]:
        true = 1.0 - float(TRUE.predict(strategy, flops, samples))
        se = math.sqrt(true * (1 - true) / TEST)
        test = se * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * rng.standard_normal())
        return true + luck_ + test, se

    def run(name: str, strategies, flops: float, steps: int, k: int) -> SeedResult:
        luck_ = rng.normal(0.0, luck)
        points = []
        for f in FRACTIONS if k == 0 else FRACTIONS[-1:]:
            s = round(f * steps)
            acc, se = measure(strategies[0], flops, s * BATCH, luck_)
            points.append(Point(f, s, s * BATCH, 3.0 * flops * s * BATCH, 1.0, acc, None, se, True))
        return SeedResult(name, k, tuple(points), (), 1.0, 1.0)

    def result(spec, seeds) -> TrialResult:
        name, strategies, flops, steps = spec
        return TrialResult(name, strategies, 1.0, 1.0, {}, 0, flops, flops / 100, BATCH, 4e-3, steps,
                           3.0 * flops, {}, TEST, tuple(seeds))

    first = {t[0]: run(*t, 0) for t in TRIALS}
    rows = [result(t, [first[t[0]]]) for t in TRIALS]
    held = {r.name for rs in held_out(rows, ("d", "w"), HOLDOUT).values() for r in rs}
    ranked = sorted((r for r in rows if r.name not in held), key=lambda r: -r.seeds[0].final.accuracy)
    again = held | {r.name for r in ranked[:LEADERS]}
    rows = [result(t, [first[t[0]]] + [run(*t, k) for k in range(1, SEEDS)] if t[0] in again else
                   [first[t[0]]]) for t in TRIALS]
    truth = {name: 1.0 - float(TRUE.predict(s[0], n, round(steps) * BATCH)) for name, s, n, steps in TRIALS}
    return rows, truth


def coverage(studies: int, seed: int = 0, **world) -> tuple[float, float, float]:
    """(share of the measured held-out values covered, share of their true values covered, mean
    width) over `studies` simulated studies, through the study's own noise estimate and backtest."""
    rng = np.random.default_rng(seed)
    measured, true, widths = [], [], []
    for _ in range(studies):
        rows, truth = study(rng, **world)
        bt = backtest.backtest(rows, ("d", "w"), HOLDOUT)
        for c in bt.checks:
            measured.append(c.covered)
            true.append(c.interval[0] <= truth[c.trial] <= c.interval[1])
            widths.append(c.interval[1] - c.interval[0])
    return float(np.mean(measured)), float(np.mean(true)), float(np.mean(widths))


def _report(label: str, studies: int, seconds: float, measured: float, true: float, width: float) -> None:
    print(f"\n{label}: {LEVEL:.0%} intervals over {studies} studies cover {measured:.1%} of the measured "
          f"held-out values, {true:.1%} of the true ones; mean width {100 * width:.1f} points; "
          f"{seconds:.0f} s")


@pytest.mark.slow  # 200 studies, each a backtest's structure choice, fit and refits: a minute
def test_level_intervals_cover_about_level_of_the_held_out_trials(monkeypatch):
    # Fewer refits than the study's 200 (each costs a fit): 20 and 40 gave the same coverage and
    # width here, 10 covered 4 points less (quantiles of too few refits are too narrow).
    monkeypatch.setattr(lawfit, "BOOTSTRAP", REFITS)
    start = time.perf_counter()
    measured, true, width = coverage(STUDIES)
    _report("the study's noise model", STUDIES, time.perf_counter() - start, measured, true, width)
    assert 0.80 <= measured <= 0.97


@pytest.mark.slow  # 20 studies: seconds
def test_the_calibration_check_fails_where_the_noise_is_ignored(monkeypatch):
    """Without the noise (no seed luck, no common sampling error, intervals from the refits alone)
    the same intervals cover far less than they claim: the check above can fail."""
    monkeypatch.setattr(lawfit, "BOOTSTRAP", REFITS)
    monkeypatch.setattr(lawfit, "SHARED", 0.0)
    monkeypatch.setattr(backtest, "noise", lambda rows: Noise(0.0, 0, 0.0))
    start = time.perf_counter()
    measured, true, width = coverage(IGNORED_STUDIES, seed=1)
    _report("noise ignored", IGNORED_STUDIES, time.perf_counter() - start, measured, true, width)
    assert measured < 0.80


if __name__ == "__main__":
    import sys

    lawfit.BOOTSTRAP = int(sys.argv[2]) if len(sys.argv) > 2 else REFITS
    n = int(sys.argv[1]) if len(sys.argv) > 1 else STUDIES
    t = time.perf_counter()
    print(coverage(n, seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0), f"{time.perf_counter() - t:.0f} s")
