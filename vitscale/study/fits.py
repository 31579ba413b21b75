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

ALPHA_STARTS = (0.2, 0.6, 1.2)
BETA_STARTS = (0.2, 0.6, 1.2)
MAX_EXPONENT = 3.0


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

    def alpha(self, strategy: str) -> float:
        return self.alphas[self.strategies.index(strategy)]

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


def _grid(y: np.ndarray, strategies: int) -> list[np.ndarray]:
    """The starts of a fit from scratch: the floor at half the least error, the rest of the spread
    shared evenly by the size and length terms, over a grid of exponents."""
    spread = max(float(y.max() - y.min()), 1e-3)
    return [
        np.array(
            [
                np.log(max(float(y.min()) * f, 1e-4)),
                np.log(share * spread),
                np.log((1 - share) * spread),
                beta,
                0.0,
            ]
            + [alpha] * strategies
        )
        for f, alpha, beta, share in itertools.product((0.5,), ALPHA_STARTS, BETA_STARTS, (0.5,))
    ]


def fit_law(
    strategy: Sequence[str],
    size: Sequence[float],
    samples: Sequence[float],
    error: Sequence[float],
    n0: float | None = None,
    huber: float = 0.01,
    start: Law | None = None,
) -> Law:
    """Fit the law to points (strategy, N, D, error).

    Coefficients are fitted as logs (positive by construction), exponents in [0, 3]. Every
    strategy needs a point of another size than n0 (its exponent is otherwise unknown), and
    the points need two or more lengths. `start`: a previous fit to start from alone (the
    bootstrap's refits), instead of the grid.
    """
    from scipy.optimize import minimize

    n, d, y = (np.asarray(v, dtype=float) for v in (size, samples, error))
    names = tuple(dict.fromkeys(strategy))
    n0 = float(n.min()) if n0 is None else float(n0)
    for s in names:
        if not any(ni != n0 for si, ni in zip(strategy, n, strict=True) if si == s):
            raise ValueError(f"strategy {s} has no trial but the base to fit its size exponent on")
    if len(np.unique(d)) < 2 or len(y) < 5 + len(names):
        raise ValueError("the law needs two or more training lengths and more points than parameters")
    d0 = float(d.min())
    ln, ld = np.log(n / n0), np.log(d / d0)
    which = np.array([names.index(s) for s in strategy])

    onehot = np.eye(len(names))[which]  # [points, strategies]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Huber loss of the residuals and its gradient (as few array operations as it takes: the
        fits evaluate it tens of thousands of times, the bootstrap's refits most)."""
        floor = np.exp(theta[0])
        size = np.exp(theta[1] - theta[5:][which] * ln)
        length = np.exp(theta[2] - theta[3] * ld - theta[4] * ln)
        r = size + length + (floor - y)
        psi = np.clip(r, -huber, huber)  # d loss / d r: r inside the Huber band, +-huber outside
        by_length, by_size = psi * length, psi * size
        grad = np.empty_like(theta)
        grad[0], grad[1], grad[2] = psi.sum() * floor, by_size.sum(), by_length.sum()
        grad[3], grad[4] = -(by_length @ ld), -(by_length @ ln)
        grad[5:] = -((by_size * ln) @ onehot)
        # 0.5 r^2 inside the band, huber (|r| - huber / 2) outside: both are psi (r - psi / 2)
        return float(psi @ (r - 0.5 * psi)), grad

    bounds = [(-12, 0.5), (-12, 1.5), (-12, 1.5), (0, MAX_EXPONENT), (0, MAX_EXPONENT)]
    bounds += [(0, MAX_EXPONENT)] * len(names)
    starts = [_theta(start)] if start is not None else _grid(y, len(names))
    best = None
    for theta in starts:
        r = minimize(
            loss,
            np.clip(theta, *np.array(bounds).T),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 1000},
        )
        if best is None or r.fun < best.fun:
            best = r
    le, la, lb, beta, gamma, *alphas = best.x
    law = Law(
        names,
        float(np.exp(le)),
        float(np.exp(la)),
        tuple(float(a) for a in alphas),
        float(np.exp(lb)),
        float(beta),
        float(gamma),
        n0,
        d0,
        0.0,
        len(y),
    )
    fitted = np.array([law.predict(s, ni, di) for s, ni, di in zip(strategy, n, d, strict=True)])
    return replace(law, rmse=float(np.sqrt(np.mean((fitted - y) ** 2))))


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
