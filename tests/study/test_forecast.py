"""The backtest across compute against studies drawn from a known law: fitted at or below C/4 it
predicts every trial at C, and picks the best shape there where persistence does not."""

from dataclasses import replace

import numpy as np
import pytest
from test_analysis import BASE, TRUE, trial

from vitscale.cost.complexity import cost
from vitscale.cost.scaling import scale
from vitscale.study import analysis, forecast, lawfit
from vitscale.study.config import StudyConfig
from vitscale.study.summary import Noise

FRACTIONS = (0.0625, 0.125, 0.25, 0.5, 1.0)
NOISE = Noise(0.004, 4, 0.004)


@pytest.fixture(autouse=True)
def _few_refits(monkeypatch):
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 40)


def compute_study(compute: float, law=TRUE, sd=0.0, seed=0) -> list:
    """Every trial trains `compute` multiply-adds (a compute budget), the length its size allows."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, f in [("d", 1)] + [(s, f) for s in ("d", "w") for f in (0.5, 2, 4)]:
        per_step = 10 * 3.0 * cost(scale(BASE, s, f)).flops  # batch 10, forward and backward
        rows.append(
            trial(
                s,
                f,
                round(compute / per_step),
                law,
                seeds=(0, 1) if f == 4 else (0,),
                sd=sd,
                rng=rng,
                fractions=FRACTIONS,
            )
        )
    return rows


def test_points_in_the_first_tenth_of_a_budget_are_measured_not_fitted():
    """A run's first tenth is warm-up and the first drop: C/16 points at chance change no fit."""
    rows = compute_study(3e11)
    chance = [replace(r, seeds=tuple(replace(s, points=tuple(
        replace(p, accuracy=0.1) if p.fraction < lawfit.FIT_FROM else p for p in s.points)) for s in r.seeds))
        for r in rows]
    assert any(p.accuracy == 0.1 for r in chance for p in r.points())
    for fit_ in (lambda rs: forecast.forecast(rs, ("d", "w"), NOISE),
                 lambda rs: lawfit.points(lawfit.labelled(rs, ("d", "w")))):
        assert fit_(chance) == fit_(rows)


def test_exact_points_forecast_every_trial_and_the_best_shape():
    rows = compute_study(3e11)
    fc = forecast.forecast(rows, ("d", "w"), NOISE)
    assert fc.note == "" and len(fc.checks) == len(rows)
    assert fc.points == 2 * len(rows)  # 1/8 and 1/4 of each trial, seed 0 alone (1/16: below FIT_FROM)
    assert fc.max_abs_error < 3e-3  # two points a trial, seven parameters: not quite exact
    truth = {c.trial: c.measured for c in fc.checks}
    assert fc.pick == max(truth, key=truth.get) and fc.regret == 0.0
    assert fc.covered == len(rows)
    for c in fc.checks:  # what each trial measured at C and at C/4, read independently
        r = next(r for r in rows if r.name == c.trial)
        assert c.measured == pytest.approx(np.mean([s.final.accuracy for s in r.seeds]))
        assert c.early == next(p.accuracy for p in r.seeds[0].points if p.fraction == 0.25)


def test_the_law_sees_the_optimum_move_where_persistence_and_straight_lines_do_not():
    """A law whose best shape at C is larger than at C/4 (the optimum grows with compute): the
    law's pick has no regret, persistence's has some, and a straight line in log samples, which
    cannot bend, errs by more than the law."""
    law = replace(TRUE, beta=0.6, gamma=0.3)
    rows = compute_study(3e11, law)
    fc = forecast.forecast(rows, ("d", "w"), NOISE)
    at = {c.trial: (c.early, c.measured) for c in fc.checks}
    assert max(at, key=lambda t: at[t][0]) != max(at, key=lambda t: at[t][1]), at  # the world moved
    assert fc.regret == 0.0 and fc.persistence_regret > 0.002
    assert fc.loglinear_mean_abs_error > 2 * fc.mean_abs_error


def test_log_linear_extends_each_trials_own_line():
    r = forecast.early(compute_study(3e11)[1], 0.25)
    pts = r.points()
    x, y = np.log([p.samples for p in pts]), np.array([p.accuracy for p in pts])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    expected = y.mean() + slope * (np.log(4 * pts[-1].samples) - x.mean())
    assert forecast.loglinear(r, 4 * pts[-1].samples) == pytest.approx(expected)


def test_without_two_fractions_below_the_cut_it_says_what_to_run():
    rows = [trial(s, f, 2000, fractions=(0.35, 0.5, 0.71, 1.0)) for s, f in [("d", 1), ("d", 2), ("w", 2)]]
    fc = forecast.forecast(rows, ("d", "w"), NOISE)
    assert not fc.checks and "--fractions 0.0625,0.125,0.25,0.5,1" in fc.note


def test_the_summary_and_report_lead_with_it(tmp_path):
    from vitscale.study import report

    rows = compute_study(3e11, sd=0.002, seed=1)
    s = analysis.summarize(StudyConfig(strategies=("d", "w"), fractions=FRACTIONS), rows)
    assert s.forecast.checks and s.forecast.pick
    report.write(tmp_path, s, rows)
    text = (tmp_path / "report.md").read_text()
    assert text.index("Forecast across compute") < text.index("Backtest:") < text.index("Recommendation")
    assert f"regret {100 * s.forecast.regret:.1f} points" in text
    assert "Loss first (the law on test cross-entropy, then mapped to accuracy): not fitted" in text


def test_what_rests_on_a_bound_is_marked_unreliable(tmp_path, monkeypatch):
    """A law with e at its floor (points with no error floor to find): the law section names it,
    and the recommendation and every larger budget's forecast resting on it say so."""
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 4)
    from vitscale.study import report

    rows = compute_study(3e11, replace(TRUE, e=1e-7))
    s = analysis.summarize(StudyConfig(strategies=("d", "w"), fractions=FRACTIONS), rows)
    assert "e" in s.law.laws[0].at_bounds() and "e" in s.recommendation.pick.bounds
    assert all("e" in c.bounds for c in s.recommendation.ahead)
    report.write(tmp_path, s, rows)
    text = (tmp_path / "report.md").read_text()
    assert "**At a bound of the fit**" in text and "**Unreliable:** it rests on e" in text
