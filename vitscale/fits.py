"""Fits for the scaling study: a saturating power law of error against compute, with
bootstrap intervals, a linear runtime model, and the compute frontier they are fitted to.

    error(C) = e_inf + a * (C / C0) ** -b        a, b, e_inf >= 0;  C0 = the smallest compute

For a fixed exponent b the law is linear in (e_inf, a), so the fit is a one-dimensional
search over b with a closed-form non-negative least-squares solve inside.
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
