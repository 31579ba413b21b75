"""Fits for the scaling study: a saturating power law of error against compute, with
bootstrap intervals, a linear runtime model, and the compute frontier they are fitted to.

    error(C) = e_inf + a * (C / C0) ** -b        a, b, e_inf >= 0;  C0 = the smallest compute

For a fixed exponent b the law is linear in (e_inf, a), so the fit is a one-dimensional
search over b with a closed-form non-negative least-squares solve inside.

    error(N, D) = e + a * (N / n0) ** -alpha + b * (D / d0) ** -beta

over model size N and training samples D (Hoffmann et al. 2022, approach 3) is fitted
with a Huber loss from several starts; the study backtests it on held-out trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXPONENTS = np.geomspace(0.01, 3.0, 240)  # the grid searched for b before refining


@dataclass(frozen=True)
class PowerLaw:
    e_inf: float  # error the law saturates at
    a: float  # scale of the reducible error at C0
    b: float  # exponent
    c0: float  # compute unit (the smallest compute fitted)
    r2: float  # coefficient of determination on the fitted points
    rmse: float  # root mean squared error of the fit (error units)
    points: int

    def predict(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.e_inf + self.a * (np.asarray(compute, dtype=float) / self.c0) ** -self.b

    def as_dict(self) -> dict:
        return asdict(self)


def _nonneg_lstsq(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """min ||e + a*u - y||^2 over e, a >= 0; returns (e, a, sse)."""
    best = None
    # The unconstrained optimum, then each side of the constraint boundary.
    A = np.stack([np.ones_like(u), u], axis=1)
    (e, a), *_ = np.linalg.lstsq(A, y, rcond=None)
    options = [(e, a)] if e >= 0 and a >= 0 else []
    options += [(float(np.mean(y)), 0.0), (0.0, max(0.0, float(u @ y / max(u @ u, 1e-300))))]
    for e, a in options:
        sse = float(np.sum((e + a * u - y) ** 2))
        if best is None or sse < best[2]:
            best = (float(e), float(a), sse)
    return best


def fit_power_law(compute: Sequence[float], error: Sequence[float]) -> PowerLaw:
    """Least-squares fit of the saturating power law; needs three distinct computes."""
    c, y = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    if len(np.unique(c)) < 3:
        raise ValueError("a power-law fit needs points at three or more different computes")
    c0 = float(c.min())
    x = c / c0

    def solve(b: float) -> tuple[float, float, float]:
        return _nonneg_lstsq(x**-b, y)

    sses = [solve(b)[2] for b in EXPONENTS]
    i = int(np.argmin(sses))
    lo, hi = EXPONENTS[max(i - 1, 0)], EXPONENTS[min(i + 1, len(EXPONENTS) - 1)]
    for _ in range(40):  # golden-section refinement between the grid neighbours
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[2] <= solve(m2)[2] else (m1, hi)
    b = (lo + hi) / 2
    e_inf, a, sse = solve(b)
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else float("nan")
    return PowerLaw(e_inf, a, float(b), c0, r2, float(np.sqrt(sse / len(y))), len(y))


def bootstrap(compute: Sequence[float], error: Sequence[float], at: Sequence[float], samples: int = 200,
              seed: int = 0, level: float = 0.9) -> dict[str, tuple[float, float]]:
    """Percentile intervals of b, e_inf and the predicted error at each compute in `at`,
    from refits to points resampled with replacement."""
    c, y = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"b": [], "e_inf": []} | {f"at_{i}": [] for i in range(len(at))}
    for _ in range(samples):
        idx = rng.integers(0, len(c), len(c))
        if len(np.unique(c[idx])) < 3:
            continue
        law = fit_power_law(c[idx], y[idx])
        draws["b"].append(law.b)
        draws["e_inf"].append(law.e_inf)
        for i, point in enumerate(at):
            draws[f"at_{i}"].append(float(law.predict(point)))
    q = (1 - level) / 2
    return {k: (float(np.quantile(v, q)), float(np.quantile(v, 1 - q))) if v else (float("nan"),) * 2
            for k, v in draws.items()}


def frontier(compute: Sequence[float], error: Sequence[float]) -> tuple[list[float], list[float]]:
    """The lower envelope: points with less error than every point of less or equal compute."""
    order = sorted(zip(compute, error, strict=True))
    xs, ys, best = [], [], float("inf")
    for c, e in order:
        if e < best:
            if xs and xs[-1] == c:
                xs.pop(), ys.pop()
            xs.append(c)
            ys.append(e)
            best = e
    return xs, ys


@dataclass(frozen=True)
class RuntimeModel:
    """seconds per sample ~ per_flop * flops + per_act * acts + overhead."""

    per_flop: float
    per_act: float
    overhead: float
    r2: float
    points: int

    def predict(self, flops: float, acts: float) -> float:
        return self.per_flop * flops + self.per_act * acts + self.overhead

    def as_dict(self) -> dict:
        return asdict(self)


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
    return RuntimeModel(float(coef[0] / fs), float(coef[1] / as_), float(coef[2]),
                        1.0 - sse / sst if sst > 0 else float("nan"), len(t))


# ----------------------------------------------------------------------------- size and length
@dataclass(frozen=True)
class JointLaw:
    """error(N, D) = e + a (N / n0)^-alpha + b (D / d0)^-beta (Chinchilla's third approach):
    N a model size (forward multiply-adds per sample), D the training samples seen."""

    e: float
    a: float
    alpha: float
    b: float
    beta: float
    n0: float  # size unit (the smallest fitted)
    d0: float  # samples unit (the smallest fitted)
    rmse: float  # root mean squared error of the fit (error units)
    points: int

    def predict(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.e + self.a * (n / self.n0) ** -self.alpha + self.b * (d / self.d0) ** -self.beta

    def as_dict(self) -> dict:
        return asdict(self)


def fit_joint_law(size: Sequence[float], samples: Sequence[float], error: Sequence[float],
                  huber: float = 0.01) -> JointLaw:
    """Fit error(N, D) with a Huber loss from a grid of starts (as Hoffmann et al. 2022).

    Coefficients are fitted as logs (positive by construction), exponents within [0, 3].
    Needs two or more sizes and two or more lengths, and more points than the five parameters.
    """
    from scipy.optimize import minimize

    n, d, y = (np.asarray(v, dtype=float) for v in (size, samples, error))
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(y) < 6:
        raise ValueError("a size-and-length law needs two or more sizes, two or more lengths and six points")
    n0, d0 = float(n.min()), float(d.min())
    ln, ld = np.log(n / n0), np.log(d / d0)

    def loss(theta: np.ndarray) -> float:
        le, la, alpha, lb, beta = theta
        r = np.exp(le) + np.exp(la - alpha * ln) + np.exp(lb - beta * ld) - y
        small = np.abs(r) <= huber
        return float(np.sum(np.where(small, 0.5 * r**2, huber * (np.abs(r) - 0.5 * huber))))

    bounds = [(-12, 0.5), (-12, 1.5), (0, 3), (-12, 1.5), (0, 3)]
    best = None
    for le in (np.log(max(y.min() * 0.5, 1e-4)), np.log(max(y.min() * 0.9, 1e-4))):
        for alpha in (0.2, 0.6, 1.2):
            for beta in (0.2, 0.6, 1.2):
                for share in (0.3, 0.7):
                    spread = max(y.max() - y.min(), 1e-3)
                    start = np.array([le, np.log(share * spread), alpha, np.log((1 - share) * spread), beta])
                    r = minimize(loss, start, method="L-BFGS-B", bounds=bounds,
                                 options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
                    if best is None or r.fun < best.fun:
                        best = r
    le, la, alpha, lb, beta = best.x
    law = JointLaw(float(np.exp(le)), float(np.exp(la)), float(alpha), float(np.exp(lb)), float(beta),
                   n0, d0, 0.0, len(y))
    rmse = float(np.sqrt(np.mean((law.predict(n, d) - y) ** 2)))
    return JointLaw(**(asdict(law) | {"rmse": rmse}))
