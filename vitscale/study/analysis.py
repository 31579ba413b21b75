"""What a scaling study's trials say, every claim checked: summary.Summary.

lawfit      every annealed point of every seed: (strategy, N, D, error), N the model's
            forward multiply-adds per sample, D the samples it trained on; the noise; the
            law error(s, N, D) = e + a (N/n0)^-alpha_s + b (D/d0)^-beta (N/n0)^-gamma
            (fits.fit_law) and its bootstrap refits: the spread of a prediction
backtest    the law fitted without each strategy's largest trials predicts them
recommend   for a compute or time budget, each strategy's best size (and so length)
            under the law refitted on every trial; candidates within noise tie and the
            cheapest is named; beside it, the best trial measured within the budget
isoflops    trials at equal compute, measured, as a check of the law's optimum
valleys     each family's trials at equal compute: is its optimum bracketed, and N_opt ~ C^a
analysis    all of it in order (`summarize`), with the runtime model and the sweep's cost
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from vitscale.common import stats
from vitscale.study import fits
from vitscale.study.backtest import backtest
from vitscale.study.config import StudyConfig, base_run
from vitscale.study.diagnose import diagnose, fitted
from vitscale.study.forecast import forecast
from vitscale.study.isoflops import isoflops
from vitscale.study.lawfit import able, fit, n0s, noise
from vitscale.study.rates import rates
from vitscale.study.recommend import recommend
from vitscale.study.results import SweepPoint, TrialResult
from vitscale.study.summary import LEVEL, Growth, Parameter, Runtime, Summary, Sweep
from vitscale.study.trials import held_out
from vitscale.study.valleys import scaling, valleys


# ----------------------------------------------------------------------------- runtime, sweep
def runtime(rows: list[TrialResult]) -> Runtime:
    seconds = [1.0 / r.measured["samples_per_s"] for r in rows]
    flops, acts = [r.flops for r in rows], [r.acts for r in rows]
    pearson = [stats.pearson([getattr(r, k) for r in rows], seconds) for k in ("flops", "params", "acts")]
    model, loo, note = None, (), ""
    try:
        model = fits.fit_runtime(flops, acts, seconds)
        loo = tuple(fits.runtime_loo(flops, acts, seconds))
    except ValueError as e:
        note = str(e)
    return Runtime(*pearson, model, loo, note)


def _sweep(sweep: list[SweepPoint], rows: list[TrialResult]) -> Sweep | None:
    if not sweep:
        return None
    compute = sum(p.compute for p in sweep)
    trials = sum(r.compute * len(r.seeds) for r in rows)
    found = rates(sweep)
    base = next((r for r in rows if r.name == "base"), None)
    return Sweep(
        tuple(sweep),
        found.at(base.steps) if base is not None else found.best[-1],
        compute,
        trials,
        compute / trials if trials else float("nan"),
        sum(p.wall_s for p in sweep),
        found.steps,
        found.best,
        found.exponent,
    )


def _parameters(law: fits.Laws, laws: list[fits.Laws]) -> tuple[Parameter, ...]:
    q = (1 - LEVEL) / 2

    def interval(values) -> tuple[float, float]:
        return (float(np.quantile(values, q)), float(np.quantile(values, 1 - q))) if laws else (math.nan,) * 2

    out = []
    for i, one in enumerate(law.laws):
        tag = "" if law.shared else f"[{one.strategies[0]}]"
        draws = [x.laws[i] for x in laws]
        for name in ("e", "a", "b", "beta", "gamma"):
            out.append(Parameter(name + tag, getattr(one, name), interval([getattr(x, name) for x in draws])))
        out += [
            Parameter(f"alpha[{s}]", one.alpha(s), interval([x.alpha(s) for x in draws]))
            for s in one.strategies
        ]
    return tuple(out)


def summarize(study: StudyConfig, rows: list[TrialResult], sweep: list[SweepPoint] = ()) -> Summary:
    """Backtest first (fits without the held-out trials), then the law refitted on every trial a
    flag does not leave out (diagnose.py) for the recommendation, the frontier and the IsoFLOP check."""
    flags = diagnose(rows)
    measured, rows = rows, fitted(rows, flags)
    left_out = frozenset(r.name for r in measured) - {r.name for r in rows}
    strategies = tuple(study.families)
    # the seed noise every choice below reads (valleys, ties, intervals): of the trials the backtest
    # does not judge, as its own is. The held-out trials are each family's largest, the shortest runs
    # and the noisiest: on the demo one seed of one of them, 6 points low, made the whole study
    # "unresolved below 2.7 points" and unbracketed a valley that 0.4 points of noise resolve.
    held = {r.name for rs in held_out(measured, strategies, study.holdout).values() for r in rs}
    noise_ = noise([r for r in rows if r.name not in held] or rows)
    bt = backtest(measured, strategies, study.holdout, left_out)  # its own noise: that of the trials it fits
    n0 = n0s(rows)
    fittable = able(rows, strategies, n0)
    law, laws, choice = None, [], None
    if fittable:  # a law needs a trial of another size than its base (--collect with the base alone has none)
        with contextlib.suppress(ValueError):  # too few points for its parameters
            law, laws, choice = fit(rows, fittable, n0, noise_)
    rows = measured  # what was measured: the best trial, the valleys, the runtime and the growth
    rt = runtime(rows)
    rec, frontier, shapes = recommend(study, rows, law, laws, noise_, rt.model)
    growth = tuple(
        Growth(
            s,
            tuple(r.name for r in m),
            stats.loglog_slope([r.flops for r in m], [r.acts for r in m])
            if len({r.flops for r in m}) > 1
            else math.nan,
        )
        for s in strategies
        if (m := sorted((r for r in rows if s in r.strategies), key=lambda r: r.flops))
    )
    note = (
        "The law is fitted to the k-NN top-1 of each cooldown's end; the trials' final accuracy is the "
        "linear probe of their full-length encoder."
        if study.objective == "mae"
        else ""
    )
    vs = valleys(rows, strategies, noise_)
    split = "test" if base_run(study).data.has_test else "val"  # what final accuracies are measured on
    return Summary(
        study.budget,
        study.parsed_budget.kind,
        study.objective,
        study.param,
        f"linear-probe {split} top-1" if study.objective == "mae" else f"{split} top-1",
        note,
        strategies,
        len(rows),
        sum(r.wall_s for r in rows),
        noise_,
        flags,
        forecast(rows, strategies, noise_, left_out=left_out),
        bt,
        law,
        choice,
        _parameters(law, laws) if law else (),
        rec,
        (),  # verified: the runner's, once it has trained the pick
        frontier,
        isoflops(rows, law, shapes),
        vs,
        scaling(vs, frontier, strategies),
        _sweep(list(sweep), rows),
        rt,
        growth,
    )
