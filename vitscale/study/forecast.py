"""The backtest across compute: the law fitted on every annealed point at or below a quarter of each
trial's budget (C/4; under a compute budget every trial's C is the same) predicts what every trial
reached at its full budget, and which shape is best there.

What a study is for is saying what to train at a compute it did not measure; this asks it to do
that four times beyond what it saw, and scores it as a user would: the error of each prediction,
the coverage of its intervals, and the regret of the pick (the measured accuracy of the best trial
at C less that of the trial the law picked). Beside it, two forecasts that need no law:
  persistence   the best trial at C/4 stays the best at C (a pick, no accuracies);
  log-linear    each trial's accuracy against log samples, a line through its own points at or
                below C/4, extended to C.

The intervals use the study's seed noise, measured at C (seeds beyond the first run the full length
only): it sets their width, never a prediction.

The same forecast is made with the law fitted on loss first, then mapped to accuracy (lossfirst.py),
from the same points: the default fits accuracy directly (why: the figures by CUT).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vitscale.study import lossfirst
from vitscale.study.lawfit import FIT_FROM, able, final, fit, n0s, predicted
from vitscale.study.results import TrialResult
from vitscale.study.summary import Forecast, ForecastCheck, Noise

CUT = 0.25  # the share of each trial's budget the law is fitted up to
# Fitted at or below C/4 and predicting C (docs/study.md has the table): on the four studies of the
# LR-by-length version loss first erred less in every one, on mean and max (the demo 2.2 / 4.0
# against 2.8 / 5.8 points; a depth-2 base 0.8 / 1.3 against 3.3 / 6.7), with the same regret; on
# four studies before it, the accuracy law did as well or better on mean in three. Much of loss
# first's error there was its second step: given each trial's measured loss at C, the map fitted at
# or below C/4 erred by 1.6 to 3.0 points, as C's accuracies lie above any it was fitted on. The
# accuracy law stays the default until loss first carries the intervals and the recommendation too.


def early(r: TrialResult, cut: float) -> TrialResult | None:
    """`r` as it stood at `cut` of its budget: its seeds' annealed points at or below it that a law
    is fitted to (from lawfit.FIT_FROM of the budget; None where it has none)."""
    seeds = tuple(
        replace(s, points=ps) for s in r.seeds
        if (ps := tuple(p for p in s.points if FIT_FROM <= p.fraction <= cut))
    )
    return replace(r, seeds=seeds) if seeds else None


def loglinear(r: TrialResult, samples: float) -> float | None:
    """Accuracy at `samples` from a line in log samples through r's points (None below two)."""
    pts = r.points()
    if len(pts) < 2:
        return None
    slope, intercept = np.polyfit(np.log([p.samples for p in pts]), [p.accuracy for p in pts], 1)
    return float(np.clip(intercept + slope * np.log(samples), 0.0, 1.0))


def _regret(measured: dict[str, float], pick: str | None) -> float | None:
    return None if pick is None else max(measured.values()) - measured[pick]


def forecast(
    rows: list[TrialResult], strategies: tuple[str, ...], noise_: Noise, cut: float = CUT,
    left_out: frozenset[str] = frozenset(),
) -> Forecast:
    """The law fitted on `rows`' points at or below `cut` of their budgets (but those of `left_out`,
    trials a flag keeps out of every fit), checked at the budgets, every trial's."""
    seen = {r.name: e for r in rows if (e := early(r, cut)) is not None}
    empty = Forecast(cut, 0, (), None, None, 0, None, None, None, None, None, None, None, None, "")
    fractions = sorted({p.fraction for e in seen.values() for p in e.points()})
    if len(fractions) < 2:
        return replace(
            empty,
            note=f"it needs two or more cooldown fractions from {FIT_FROM:g} to {cut:g} of the budget "
            "(--fractions 0.0625,0.125,0.25,0.5,1)",
        )
    fitted = [e for name, e in seen.items() if name not in left_out]
    n0 = n0s(fitted)
    fittable = able(fitted, strategies, n0)
    try:
        if not fittable:
            raise ValueError("no strategy has a trial of another size than its base")
        law, laws, _ = fit(fitted, fittable, n0, noise_)
    except ValueError as e:
        return replace(empty, note=f"the law could not be fitted on the points at or below {cut:g}: {e}")
    second, second_note = lossfirst.fit_noted(fitted, fittable, n0)
    rng = np.random.default_rng(2)
    checks = []
    for r in rows:
        s = next((t for t in fittable if t in r.strategies), None)
        if s is None or r.name not in seen:
            continue
        guess, span = predicted(law, laws, s, r, noise_, rng)
        measured = final(r)
        checks.append(
            ForecastCheck(
                r.name,
                s,
                r.flops,
                r.samples,
                final(seen[r.name]),
                guess,
                span,
                measured,
                loglinear(seen[r.name], r.samples),
                span[0] <= measured <= span[1],
                None if second is None else 1.0 - float(second.predict(s, r.flops, r.samples)),
            )
        )
    measured = {c.trial: c.measured for c in checks}
    pick = max(checks, key=lambda c: c.predicted).trial
    persistence = max(checks, key=lambda c: c.early).trial
    lines = [c for c in checks if c.loglinear is not None]
    line_pick = max(lines, key=lambda c: c.loglinear).trial if lines else None
    errors = [abs(c.predicted - c.measured) for c in checks]
    line_errors = [abs(c.loglinear - c.measured) for c in lines]
    firsts = [c for c in checks if c.loss_first is not None]
    first_errors = [abs(c.loss_first - c.measured) for c in firsts]
    first_pick = max(firsts, key=lambda c: c.loss_first).trial if firsts else None
    return Forecast(
        cut,
        sum(len(s.points) for e in fitted for s in e.seeds),
        tuple(checks),
        float(np.mean(errors)),
        max(errors),
        sum(c.covered for c in checks),
        pick,
        _regret(measured, pick),
        persistence,
        _regret(measured, persistence),
        line_pick,
        _regret(measured, line_pick),
        float(np.mean(line_errors)) if line_errors else None,
        max(line_errors) if line_errors else None,
        "",
        first_pick,
        _regret(measured, first_pick),
        float(np.mean(first_errors)) if first_errors else None,
        max(first_errors) if first_errors else None,
        second_note,
    )
