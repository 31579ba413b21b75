"""Loss first, then accuracy: the AI2 ladder's two steps (Bhagia et al. 2024), beside the law fitted
on accuracy directly.

    loss(s, N, D)   the law's form (fits.Law) fitted on every annealed point's test cross-entropy,
                    in log space with a Huber loss from fits.WIDE's 108 starts (Hoffmann et al.)
    accuracy(loss)  lo + (hi - lo) / (1 + exp(k (loss - l0))), k > 0: a falling sigmoid fitted on
                    every point, annealed or not, whose ends are what no loss moves past (chance
                    where the model knows nothing, a ceiling the data's label noise sets)

A loss is unbounded and falls smoothly with size and length, where an accuracy saturates near its
ceiling and moves in steps of one test item, so a law of loss may extrapolate more steadily; the
second step then carries the ceiling. Whether it does is measured, not assumed: the compute
backtest (forecast.py) scores both on the same points, and the report prints both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

from vitscale.study import fits
from vitscale.study.lawfit import FIT_FROM, _groups, _n0, labelled
from vitscale.study.results import TrialResult


def _sigmoid(loss, lo, hi, k, l0):
    return lo + (hi - lo) / (1.0 + np.exp(np.clip(k * (np.asarray(loss) - l0), -50, 50)))


@dataclass(frozen=True)
class AccuracyOfLoss:
    """accuracy = lo + (hi - lo) / (1 + exp(k (loss - l0))): falls with loss (k > 0)."""

    lo: float
    hi: float
    k: float
    l0: float
    rmse: float  # accuracy units, over the points it was fitted on
    points: int

    def __call__(self, loss):
        return _sigmoid(loss, self.lo, self.hi, self.k, self.l0)


def fit_map(loss, accuracy) -> AccuracyOfLoss:
    """The sigmoid through (loss, accuracy) points, least squares within 0 <= lo < hi <= 1."""
    x, y = np.asarray(loss, dtype=float), np.asarray(accuracy, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 5:
        raise ValueError("mapping loss to accuracy needs five or more points with both")
    start = (max(0.0, y.min() - 0.01), min(1.0, y.max() + 0.01), 4.0 / max(np.ptp(x), 1e-3),
             float(np.median(x)))
    bounds = ([0.0, 0.0, 1e-3, 0.0], [1.0, 1.0, 1e3, max(10.0, 2 * x.max())])
    theta, _ = curve_fit(_sigmoid, x, y, p0=start, bounds=bounds, maxfev=20000)
    rmse = float(np.sqrt(np.mean((_sigmoid(x, *theta) - y) ** 2)))
    return AccuracyOfLoss(*(float(t) for t in theta), rmse, len(x))


@dataclass(frozen=True)
class LossLaws:
    """The laws of loss and the map to accuracy; predict gives the error (1 - accuracy), as
    fits.Laws.predict does, so that the forecast and the backtest read either alike."""

    loss: fits.Laws
    map: AccuracyOfLoss

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.loss.strategies

    def predict(self, strategy: str, n, d):
        return 1.0 - self.map(self.loss.predict(strategy, n, d))

    def strategy_of(self, family: str) -> str | None:
        return self.loss.strategy_of(family)


def loss_points(pairs) -> tuple[list, list, list, list]:
    """Annealed points with a finite loss as (strategy, N, D, loss) columns, every seed's (from
    lawfit.FIT_FROM of the budget, as the law of accuracy takes them)."""
    rows = [(s, r.flops, p.samples, p.loss) for r, s in pairs for seed in r.seeds for p in seed.points
            if p.fraction >= FIT_FROM and p.loss is not None and math.isfinite(p.loss) and p.loss > 0]
    return tuple(list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])


def fit(rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float]) -> LossLaws:
    """One shared law of loss per recipe on `rows`' annealed points, and the map from loss to accuracy
    on every point of theirs that has both (mid-run ones too: the map is not a law of size or length,
    and more points pin its ends). ValueError where either cannot be fitted."""
    laws = []
    for group in _groups(strategies):
        pairs = labelled(rows, group)
        laws.append(fits.fit_many([fits.points(*loss_points(pairs), n0=_n0(pairs, n0))], log=True)[0])
    every = [p for r in rows for s in r.seeds for p in (*s.points, *s.curve) if p.loss is not None]
    return LossLaws(fits.Laws(tuple(laws)), fit_map([p.loss for p in every], [p.accuracy for p in every]))


def fit_noted(rows: list[TrialResult], strategies: tuple[str, ...],
              n0: dict[str, float]) -> tuple[LossLaws | None, str]:
    """`fit`, and what the report says of it: the parameters its laws left at a bound, or why it
    could not be fitted (then None)."""
    try:
        found = fit(rows, strategies, n0)
    except (ValueError, RuntimeError) as e:  # RuntimeError: curve_fit found no sigmoid
        return None, f"not fitted: {e}"
    bounded = sorted({b for law in found.loss.laws for b in law.at_bounds()})
    return found, f"its law of loss left {', '.join(bounded)} at a bound" if bounded else ""
