"""Small statistics shared by the scaler, the CLI and the study: slopes and correlations."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _centered(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(sxx, syy, sxy): centred sums of squares and cross products."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("need two equally long, non-empty sequences")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
    return sxx, syy, sxy


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    sxx, _, sxy = _centered(xs, ys)
    if sxx == 0:
        raise ValueError("a slope needs at least two different x values")
    return sxy / sxx


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Growth exponent: the slope of log ys against log xs."""
    return slope([math.log(x) for x in xs], [math.log(y) for y in ys])


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation coefficient (nan when either side is constant)."""
    sxx, syy, sxy = _centered(xs, ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
