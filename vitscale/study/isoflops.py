"""IsoFLOP profiles: trials at equal training compute, measured and under the law, as a check of
the law's optimum."""

from __future__ import annotations

import math

import numpy as np

from vitscale.study import fits
from vitscale.study.lawfit import base_trial
from vitscale.study.recommend import Shapes, optimum
from vitscale.study.results import TrialResult
from vitscale.study.summary import IsoFlop


def at(r: TrialResult, compute: float, tolerance: float = 0.1) -> tuple[float, float] | None:
    """A trial's (samples, accuracy) at `compute`: between its annealed points, linear in log
    compute; up to `tolerance` beyond its first or last point, that point's."""
    pts = r.points()
    cs = np.log([p.compute for p in pts])
    x = math.log(compute)
    if not cs[0] - tolerance <= x <= cs[-1] + tolerance:
        return None
    acc = float(np.interp(x, cs, [p.accuracy for p in pts]))
    return compute / r.train_flops_per_sample, acc


def computes(rows: list[TrialResult]) -> list[float]:
    """Where profiles are drawn: the computes of the base's annealed points (under a compute budget,
    every trial's) and powers of two of its full compute, any two at least 5% apart."""
    base = base_trial(rows)
    out: list[float] = []
    for c in sorted([p.compute for p in base.points()] + [base.compute * 2.0**k for k in range(-4, 8)]):
        if not out or c > out[-1] * 1.05:
            out.append(c)
    return out


def isoflops(rows: list[TrialResult], law: fits.Laws | None, shapes: Shapes | None) -> tuple[IsoFlop, ...]:
    """Profiles where three or more trials of different sizes meet, at `computes`."""
    out = []
    for c in computes(rows):
        at_ = [(r, v) for r in rows if (v := at(r, c))]
        if len({r.flops for r, _ in at_}) < 3:
            continue
        strategies = [r.family for r, _ in at_]
        predicted = tuple(
            1.0 - float(law.predict(ls, r.flops, d)) if law and (ls := law.strategy_of(r.family)) else None
            for r, (d, _) in at_
        )
        law_best, law_flops = "", None
        if law and shapes:
            opts = [(s, o) for s in law.strategies if (o := optimum(shapes, law, s, "compute", c))]
            if opts:
                s, (m, d) = min(opts, key=lambda o: float(law.predict(o[0], o[1][0].cost.flops, o[1][1])))
                law_best, law_flops = shapes.name(s, m), m.cost.flops
        best = max(at_, key=lambda rv: rv[1][1])[0].name
        out.append(
            IsoFlop(
                c,
                tuple(r.name for r, _ in at_),
                tuple(strategies),
                tuple(r.flops for r, _ in at_),
                tuple(d for _, (d, _) in at_),
                tuple(a for _, (_, a) in at_),
                predicted,
                best,
                law_best,
                law_flops,
            )
        )
    return tuple(out)
