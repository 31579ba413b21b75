"""Fits for the scaling study: a law of error over model size and training length, and a
runtime model, each with the checks the study reports.

    error(s, N, D) = e + a (N / n0)^-alpha_s + b (D / d0)^-beta (N / n0)^-gamma

N is a model's forward multiply-adds per sample, D the training samples it saw, s its
scaling strategy. It is Hoffmann et al.'s (2022) third approach with one exponent per
strategy (every strategy starts from the same base model, N = n0, so they share e, a and
the length term b, beta, and differ in how fast their size term falls) and one addition:
gamma lets a larger model learn more from each sample, as Kaplan et al.'s (2020) L(N, D)
does; gamma = 0 is Hoffmann's form. On the default study's backtests (four studies, eight
held-out trials) gamma took the mean absolute error from 1.63 to 1.12 points. It is fitted
with a Huber loss from a grid of starts.

    seconds per sample = per_flop * flops + per_act * acts + overhead

is fitted by least squares and judged by its leave-one-out error.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from vitscale.study import solver

FLOOR_STARTS = (0.5,)  # e as a share of the least error
ALPHA_STARTS = (0.2, 0.6, 1.2)
BETA_STARTS = (0.2, 0.6, 1.2)
SHARE_STARTS = (0.5,)  # the size term's share of the errors' spread
GAMMA_STARTS = (0.0,)
# The loss law's grid (fit_many with log): 3 x 3 x 3 x 2 x 2 = 108 starts. A loss is fitted in log
# space, where Hoffmann et al. fit theirs, from a grid of floors, exponents, shares and gammas (their
# fit's local minima lie far apart), each start's answer checked by how many starts agree with it.
# On the demo's points 189 of 192 starts of a 4 x 4 exponent grid reached one minimum.
WIDE = ((0.25, 0.5, 0.75), (0.1, 0.4, 1.2), (0.1, 0.4, 1.2), (0.3, 0.7), (0.0, 0.3))
LOG_HUBER = 1e-3  # Hoffmann et al.'s delta for residuals of log loss
MAX_EXPONENT = 3.0
AGREE = 1e-6  # relative loss within which two starts found the same minimum


@dataclass(frozen=True)
class Law:
    """error(s, N, D) = e + a (N / n0)^-alphas[s] + b (D / d0)^-beta (N / n0)^-gamma."""

    strategies: tuple[str, ...]
    e: float  # error no size or length removes
    a: float  # size term at n0
    alphas: tuple[float, ...]  # size exponent of each strategy
    b: float  # length term at d0
    beta: float  # length exponent
    gamma: float  # how much faster (per sample) a larger model learns; 0 = Hoffmann's additive form
    n0: float  # size unit: the base model's multiply-adds per sample
    d0: float  # length unit: the fewest samples fitted
    rmse: float  # root mean squared error of the fit (error units)
    points: int
    starts: int = 1  # starts the fit was solved from
    agreeing: int = 1  # starts whose loss came within AGREE of the best (a lone best may be luck)
    converged: bool = True  # the best start stopped on a settled loss, not at the iteration cap
    unit: float = 1.0  # the coefficients' bounds scale with it: the largest value fitted (at least 1)

    def alpha(self, strategy: str) -> float:
        return self.alphas[self.strategies.index(strategy)]

    def at_bounds(self) -> tuple[str, ...]:
        """The parameters the fit left at a bound (e at its floor, an exponent at 0 or MAX_EXPONENT):
        where the points could not place them, so whatever rests on them is less known than its
        interval says."""
        names = ["e", "a", "b", "beta", "gamma", *(f"alpha[{s}]" for s in self.strategies)]
        theta, bounds = _theta(self), _bounds(len(self.strategies), self.unit)
        near = np.isclose(theta, bounds[:, 0], rtol=0, atol=1e-6) | np.isclose(theta, bounds[:, 1], rtol=0,
                                                                                  atol=1e-6)
        return tuple(n for n, at in zip(names, near, strict=True) if at)

    def predict(self, strategy: str, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        size = n / self.n0
        length = self.b * (d / self.d0) ** -self.beta * size**-self.gamma
        return self.e + self.a * size ** -self.alpha(strategy) + length


@dataclass(frozen=True)
class Laws:
    """The law of every strategy: one Law they share (shared e, a, b, beta; an exponent each), or
    one Law per strategy (five parameters each)."""

    laws: tuple[Law, ...]

    @property
    def strategies(self) -> tuple[str, ...]:
        return tuple(s for law in self.laws for s in law.strategies)

    @property
    def shared(self) -> bool:
        return len(self.laws) == 1

    def law(self, strategy: str) -> Law:
        return next(law for law in self.laws if strategy in law.strategies)

    def predict(self, strategy: str, n, d):
        return self.law(strategy).predict(strategy, n, d)

    def strategy_of(self, family: str) -> str | None:
        """The strategy whose law predicts a trial of `family` ("base" agrees in every law)."""
        if family == "base":
            return self.strategies[0]
        return family if family in self.strategies else None


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.e), np.log(law.a), np.log(law.b), law.beta, law.gamma, *law.alphas])


def _grid(y: np.ndarray, strategies: int, wide: bool = False) -> list[np.ndarray]:
    """The starts of a fit from scratch: the floor at half the least error, the rest of the spread
    shared evenly by the size and length terms, over a grid of exponents (`wide`: over WIDE's grid
    of floors, exponents and shares)."""
    grid = WIDE if wide else (FLOOR_STARTS, ALPHA_STARTS, BETA_STARTS, SHARE_STARTS, GAMMA_STARTS)
    spread = max(float(y.max() - y.min()), 1e-3)
    return [
        np.array(
            [
                np.log(max(float(y.min()) * f, 1e-4)),
                np.log(share * spread),
                np.log((1 - share) * spread),
                beta,
                gamma,
            ]
            + [alpha] * strategies
        )
        for f, alpha, beta, share, gamma in itertools.product(*grid)
    ]


@dataclass(frozen=True)
class Points:
    """One fit's points, checked: its strategies, units and the solver's columns."""

    names: tuple[str, ...]
    n0: float
    d0: float
    ln: np.ndarray  # log N / n0
    ld: np.ndarray  # log D / d0
    which: np.ndarray  # index of each point's strategy in names
    y: np.ndarray  # error


def points(
    strategy: Sequence[str], size: Sequence[float], samples: Sequence[float], error: Sequence[float],
    n0: float | None = None,
) -> Points:
    """Points (strategy, N, D, error) as a fit takes them. Every strategy needs a point of another
    size than n0 (its exponent is otherwise unknown), and the points need two or more lengths."""
    n, d, y = (np.asarray(v, dtype=float) for v in (size, samples, error))
    names = tuple(dict.fromkeys(strategy))
    n0 = float(n.min()) if n0 is None else float(n0)
    for s in names:
        if not any(ni != n0 for si, ni in zip(strategy, n, strict=True) if si == s):
            raise ValueError(f"strategy {s} has no trial but the base to fit its size exponent on")
    if len(np.unique(d)) < 2 or len(y) < 5 + len(names):
        raise ValueError("the law needs two or more training lengths and more points than parameters")
    d0 = float(d.min())
    which = np.array([names.index(s) for s in strategy])
    return Points(names, n0, d0, np.log(n / n0), np.log(d / d0), which, y)


def _bounds(strategies: int, unit: float = 1.0) -> np.ndarray:
    """Coefficients as logs (positive by construction; below e^0.5 and e^1.5 times `unit`, the
    largest value fitted where it is above 1: a loss), exponents in [0, MAX_EXPONENT]."""
    top = np.log(max(unit, 1.0))
    coefficients = [(-12, 0.5 + top), (-12, 1.5 + top), (-12, 1.5 + top)]
    return np.array(coefficients + [(0, MAX_EXPONENT)] * (2 + strategies))


def _start(law: Law, d0: float) -> np.ndarray:
    """A law's parameters as a start for points whose length unit is d0 (the same curve)."""
    theta = _theta(law)
    theta[2] -= law.beta * np.log(d0 / law.d0)
    return theta


def fit_many(fits: Sequence[Points], huber: float = 0.01, start: Law | None = None,
             log: bool = False) -> list[Law]:
    """Fit the law to each set of points, all in one batch (solver.solve), each from the grid of
    starts, or from `start` alone (a bootstrap's or a leave-one-out's refits of a fitted law).
    `log`: a loss, fitted in log space from the WIDE grid with LOG_HUBER (`huber` is error's)."""
    if not fits:
        return []
    names = fits[0].names
    if any(f.names != names for f in fits):
        raise ValueError("fits solved together must share their strategies")
    starts = [[_start(start, f.d0)] if start is not None else _grid(f.y, len(names), log) for f in fits]
    unit = max(1.0, *(float(f.y.max()) for f in fits))
    per = len(starts[0])
    width = max(len(f.y) for f in fits)

    def pad(column: str, fill: float) -> np.ndarray:
        rows = [np.pad(getattr(f, column), (0, width - len(f.y)), constant_values=fill) for f in fits]
        return np.repeat(np.stack(rows), per, axis=0)

    mask = pad("y", np.nan)
    problems = solver.Problems(pad("ln", 0.0), pad("ld", 0.0), pad("which", 0).astype(int),
                               np.nan_to_num(mask), (~np.isnan(mask)).astype(float))
    solved = solver.solve(problems, np.concatenate(starts), _bounds(len(names), unit),
                          LOG_HUBER if log else huber, np.repeat(np.arange(len(fits)), per), log)
    laws = []
    for i, f in enumerate(fits):
        losses = solved.loss[i * per:(i + 1) * per]
        best = i * per + int(np.argmin(losses))
        le, la, lb, beta, gamma, *alphas = solved.theta[best]
        agreeing = int(np.sum(losses <= losses.min() * (1 + AGREE) + 1e-300))
        law = Law(names, float(np.exp(le)), float(np.exp(la)), tuple(float(a) for a in alphas),
                  float(np.exp(lb)), float(beta), float(gamma), f.n0, f.d0, 0.0, len(f.y), per, agreeing,
                  bool(solved.converged[best]), unit)
        fitted = np.array([law.predict(names[w], np.exp(a) * f.n0, np.exp(b) * f.d0)
                           for w, a, b in zip(f.which, f.ln, f.ld, strict=True)])
        laws.append(replace(law, rmse=float(np.sqrt(np.mean((fitted - f.y) ** 2)))))
    return laws


def fit_law(
    strategy: Sequence[str],
    size: Sequence[float],
    samples: Sequence[float],
    error: Sequence[float],
    n0: float | None = None,
    huber: float = 0.01,
    start: Law | None = None,
) -> Law:
    """Fit the law to points (strategy, N, D, error) with a Huber loss (see `points` for what they
    need). `start`: a previous fit to start from alone (the bootstrap's refits), instead of the grid."""
    return fit_many([points(strategy, size, samples, error, n0)], huber, start)[0]


# ----------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class RuntimeModel:
    """seconds per sample ~ per_flop * flops + per_act * acts + overhead."""

    per_flop: float
    per_act: float
    overhead: float
    r2: float  # in sample
    points: int

    def predict(self, flops, acts):
        return self.per_flop * np.asarray(flops) + self.per_act * np.asarray(acts) + self.overhead


def fit_runtime(flops: Sequence[float], acts: Sequence[float], seconds: Sequence[float]) -> RuntimeModel:
    """Least squares of time per sample on flops, acts and a constant."""
    f, a, t = (np.asarray(v, dtype=float) for v in (flops, acts, seconds))
    if len(t) < 4:
        raise ValueError("the runtime model needs four or more measured configs")
    # Scale columns to comparable magnitudes for a well-conditioned solve.
    fs, as_ = f.max(), a.max()
    A = np.stack([f / fs, a / as_, np.ones_like(f)], axis=1)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    sse = float(np.sum((A @ coef - t) ** 2))
    sst = float(np.sum((t - t.mean()) ** 2))
    return RuntimeModel(
        float(coef[0] / fs),
        float(coef[1] / as_),
        float(coef[2]),
        1.0 - sse / sst if sst > 0 else float("nan"),
        len(t),
    )


def runtime_loo(flops: Sequence[float], acts: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """Leave-one-out relative error of the runtime model: each config predicted by a fit
    to the others (needs five or more configs)."""
    f, a, t = (np.asarray(v, dtype=float) for v in (flops, acts, seconds))
    if len(t) < 5:
        raise ValueError("a leave-one-out runtime check needs five or more measured configs")
    out = []
    for i in range(len(t)):
        keep = np.arange(len(t)) != i
        m = fit_runtime(f[keep], a[keep], t[keep])
        out.append(float(m.predict(f[i], a[i]) / t[i] - 1.0))
    return out
