"""Where each family's optimum sits, measured: at each training compute its trials (an IsoFLOP slice
of the family), whether the best of them has a worse neighbour on each side (bracketed) or sits at
an edge of the sizes measured, and where a parabola in log size through them peaks. Across computes
the peaks give N_opt ~ C^a (Hoffmann et al.'s approach 2), set beside the slope of the law's own
frontier (approach 3): two estimates of one quantity that share no fit, so where they disagree one
of them is wrong, and the report says so.

A slope needs two bracketed valleys; its interval (ordinary least squares, Student's t) three.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from vitscale.study.isoflops import at, computes
from vitscale.study.results import TrialResult
from vitscale.study.summary import LEVEL, FrontierPoint, Noise, SizeScaling, Valley


def _valley(family: str, compute: float, rows: list[TrialResult], sd: float) -> Valley | None:
    """`family`'s trials at `compute` (None below three sizes): bracketed where its best beats the
    neighbour on each side by more than `sd`."""
    got = sorted(((r, v[1]) for r in rows if family in r.strategies and (v := at(r, compute))),
                 key=lambda rv: rv[0].flops)
    if len({r.flops for r, _ in got}) < 3:
        return None
    acc = np.array([a for _, a in got])
    i = int(np.argmax(acc))
    if i == 0 or i == len(got) - 1:
        edge = "smallest" if i == 0 else "largest"
    elif acc[i] - acc[i - 1] <= sd or acc[i] - acc[i + 1] <= sd:
        edge = "within noise"
    else:
        edge = ""
    optimum = None
    if not edge:
        x = np.log([r.flops for r, _ in got])
        c2, c1, _ = np.polyfit(x, acc, 2)
        if c2 < 0 and x[0] <= -c1 / (2 * c2) <= x[-1]:
            optimum = float(np.exp(-c1 / (2 * c2)))
    return Valley(family, compute, tuple(r.name for r, _ in got), tuple(r.flops for r, _ in got),
                  tuple(float(a) for a in acc), got[i][0].name, not edge, edge, optimum)


def valleys(rows: list[TrialResult], families: tuple[str, ...], noise_: Noise) -> tuple[Valley, ...]:
    """Every family's valley at every compute where three or more of its sizes meet."""
    cs = computes(rows) if rows else []
    return tuple(v for f in families for c in cs if (v := _valley(f, c, rows, noise_.seed_sd)))


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, tuple[float, float] | None]:
    """The least-squares slope of y on x, with its LEVEL interval from three points on."""
    slope, intercept = np.polyfit(x, y, 1)
    if len(x) < 3:
        return float(slope), None
    resid = y - (slope * x + intercept)
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(np.sum((x - x.mean()) ** 2)))
    t = stats.t.ppf((1 + LEVEL) / 2, len(x) - 2)
    return float(slope), (float(slope - t * se), float(slope + t * se))


def _law_slope(frontier: tuple[FrontierPoint, ...], family: str, lo: float, hi: float) -> float | None:
    """The slope of the law's optimal size against compute over [lo, hi] (None without two computes)."""
    pts = [(p.compute, p.flops) for p in frontier
           if p.strategy == family and lo * 0.99 <= p.compute <= hi * 1.01]
    if len({c for c, _ in pts}) < 2:
        return None
    return float(np.polyfit(np.log([c for c, _ in pts]), np.log([n for _, n in pts]), 1)[0])


def scaling(vs: tuple[Valley, ...], frontier: tuple[FrontierPoint, ...],
            families: tuple[str, ...]) -> tuple[SizeScaling, ...]:
    """Each family's N_opt ~ C^a from its bracketed valleys, beside the law's frontier slope."""
    out = []
    for f in families:
        mine = [v for v in vs if v.family == f]
        peaks = [v for v in mine if v.optimum is not None]
        if not mine:
            continue
        computes_ = [v.compute for v in (peaks if len(peaks) > 1 else mine)]
        law = _law_slope(frontier, f, min(computes_), max(computes_))
        if len(peaks) < 2:
            out.append(SizeScaling(f, len(peaks), None, None, law,
                                   f"{len(peaks)} of its {len(mine)} IsoFLOP slices bracket an optimum; "
                                   "a slope needs two"))
            continue
        slope, iv = _slope(np.log([v.compute for v in peaks]), np.log([v.optimum for v in peaks]))
        note = ""
        if law is not None and iv is not None and not iv[0] <= law <= iv[1]:
            note = (f"the law's frontier grows N_opt as C^{law:.2f}, outside the valleys' interval: the "
                    "law's optimum is not where the measured trials put it")
        out.append(SizeScaling(f, len(peaks), slope, iv, law, note))
    return tuple(out)


def unbracketed(vs: tuple[Valley, ...]) -> list[Valley]:
    """Each family's valley at the largest compute it has one, where it is not bracketed."""
    top: dict[str, Valley] = {}
    for v in vs:
        if v.family not in top or v.compute > top[v.family].compute:
            top[v.family] = v
    return [v for v in top.values() if not v.bracketed]
