"""Loss first, then accuracy, against known truths: a law of loss recovered in log space from the wide
grid of starts, a sigmoid map recovered from its points, and a compute forecast whose world is
exactly loss-first predicted by it almost perfectly, beside the accuracy law."""

from dataclasses import replace

import numpy as np
from scipy.optimize import least_squares
from test_analysis import N0, trial

from vitscale.study import analysis, fits, forecast, lawfit, lossfirst, report
from vitscale.study.config import StudyConfig
from vitscale.study.summary import Noise

LOSS = fits.Law(("d", "w"), 0.35, 0.6, (0.3, 0.7), 1.8, 0.45, 0.1, N0, 1e4, 0.0, 0)
MAP = lossfirst.AccuracyOfLoss(0.1, 0.95, 3.0, 1.2, 0.0, 0)


def _columns(rng=None, sd=0.0):
    s, n, d, y = [], [], [], []
    for strategy, factors in (("d", (1, 2, 4)), ("w", (2, 4))):
        for f in factors:
            for samples in (1e4, 3e4, 1e5, 3e5):
                s.append(strategy)
                n.append(N0 * f)
                d.append(samples)
                loss = float(LOSS.predict(strategy, N0 * f, samples))
                y.append(loss * (np.exp(rng.normal(0, sd)) if sd else 1.0))
    return s, n, d, y


def test_a_law_of_loss_is_recovered_in_log_space_from_the_wide_grid():
    law = fits.fit_many([fits.points(*_columns(), n0=N0)], log=True)[0]
    assert law.starts == 108 and law.agreeing > 1 and law.converged
    assert law.unit > 1  # losses above 1 widen the coefficients' bounds
    for strategy, f, samples in (("d", 8, 1e6), ("w", 8, 3e6)):  # beyond the points: the law itself
        truth = float(LOSS.predict(strategy, N0 * f, samples))
        assert abs(float(law.predict(strategy, N0 * f, samples)) / truth - 1) < 1e-3


def test_the_log_fit_is_the_huber_minimum_scipy_finds():
    """With noise, the batch solver's log-space fit sits where scipy's least_squares with a Huber loss
    on log residuals (Hoffmann et al.'s objective) settles from the truth."""
    s, n, d, y = _columns(np.random.default_rng(0), sd=0.03)
    law = fits.fit_many([fits.points(s, n, d, y, n0=N0)], log=True)[0]
    which = np.array([("d", "w").index(x) for x in s])
    ln, ld, ly = np.log(np.asarray(n) / N0), np.log(np.asarray(d) / min(d)), np.log(y)

    def residuals(t):
        le, la, lb, beta, gamma, a_d, a_w = t
        alpha = np.where(which == 0, a_d, a_w)
        return np.log(np.exp(le) + np.exp(la - alpha * ln) + np.exp(lb - beta * ld - gamma * ln)) - ly

    start = [np.log(LOSS.e), np.log(LOSS.a), np.log(LOSS.b) - LOSS.beta * np.log(min(d) / LOSS.d0),
             LOSS.beta, LOSS.gamma, *LOSS.alphas]
    ref = least_squares(residuals, start, loss="huber", f_scale=fits.LOG_HUBER,
                        bounds=fits._bounds(2, law.unit).T)
    ours = fits._theta(law)  # its length unit is LOSS's, the fewest samples

    def objective(t):
        r = np.abs(residuals(t))
        return np.sum(np.where(r <= fits.LOG_HUBER, 0.5 * r**2, fits.LOG_HUBER * (r - 0.5 * fits.LOG_HUBER)))

    assert objective(ours) <= objective(ref.x) * (1 + 1e-6)


def test_the_map_recovers_its_sigmoid_and_falls_with_loss():
    rng = np.random.default_rng(1)
    loss = rng.uniform(0.3, 2.3, 200)
    fitted = lossfirst.fit_map(loss, MAP(loss) + rng.normal(0, 0.005, 200))
    grid = np.linspace(0.2, 3.0, 50)
    assert np.max(np.abs(fitted(grid) - MAP(grid))) < 0.01 and fitted.rmse < 0.007
    assert np.all(np.diff(fitted(grid)) < 0)


def _loss_first_trial(strategy, factor, steps):
    """A trial of test_analysis's, its points' loss from LOSS and their accuracy its map."""
    r = trial(strategy, factor, steps, fractions=(0.125, 0.25, 0.5, 1.0))

    def moved(p):
        loss = float(LOSS.predict(strategy, r.flops, p.samples))
        return replace(p, loss=loss, accuracy=float(MAP(loss)))

    return replace(r, seeds=tuple(replace(s, points=tuple(moved(p) for p in s.points)) for s in r.seeds))


def test_a_loss_first_world_is_forecast_by_loss_first_beside_the_accuracy_law(monkeypatch, tmp_path):
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 4)
    rows = [_loss_first_trial("d", 1, 2000)]
    rows += [_loss_first_trial(s, f, round(2000 / f)) for s, fs in (("d", (0.5, 2, 4)), ("w", (0.5, 2, 4)))
             for f in fs]
    fc = forecast.forecast(rows, ("d", "w"), Noise(0.004, 0, 0.004))
    assert fc.loss_first_mean_abs_error < 0.005 and fc.loss_first_regret == 0.0
    assert all(c.loss_first is not None for c in fc.checks) and fc.mean_abs_error is not None
    s = analysis.summarize(StudyConfig(strategies=("d", "w"), fractions=(0.125, 0.25, 0.5, 1.0)), rows)
    report.write(tmp_path, s, rows)
    assert (f"mean error {100 * s.forecast.loss_first_mean_abs_error:.1f}, max "
            in (tmp_path / "report.md").read_text())
    blind = [replace(r, seeds=tuple(replace(s, points=tuple(replace(p, loss=None) for p in s.points))
                                    for s in r.seeds)) for r in rows]
    none = forecast.forecast(blind, ("d", "w"), Noise(0.004, 0, 0.004))
    assert none.loss_first_mean_abs_error is None and none.loss_first_note.startswith("not fitted")
    assert none.mean_abs_error == fc.mean_abs_error  # the accuracy law does not read losses
