"""The backtest: the law fitted without each strategy's largest trials predicts them, each with
an interval, before the law is refitted on every trial for the recommendation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vitscale.study.lawfit import able, final, fit, n0s, noise, predicted
from vitscale.study.results import TrialResult
from vitscale.study.summary import Backtest, Check
from vitscale.study.trials import held_out


def backtest(rows: list[TrialResult], strategies: tuple[str, ...], holdout: int,
             left_out: frozenset[str] = frozenset()) -> Backtest:
    """Fit without the held-out trials, predict each one's final accuracy with an interval. The noise
    is the fitted trials' own: the held-out trials run every seed, and letting their spread set the
    intervals that judge them would let what is judged widen (or narrow) its own test. `left_out`:
    trials a flag keeps out of every fit (diagnose.py), judged all the same where held out."""
    held = held_out(rows, strategies, holdout)
    names = {r.name for rs in held.values() for r in rs}
    fitted = [r for r in rows if r.name not in names | left_out]
    noise_ = noise(fitted)
    n0 = n0s(rows)
    fittable = able(fitted, strategies, n0)
    notes = [
        f"{s} keeps no trial but the base once its largest is held out, so it is not backtested"
        for s in strategies
        if s not in fittable and held[s]
    ]
    empty = Backtest(tuple(sorted(names)), tuple(r.name for r in fitted), None, None, (), None, None, 0, "")
    if not names:
        return replace(empty, note="nothing held out (holdout 0)" if not holdout else
                       "no trial but a base has finished, so none is held out")
    if not fittable:
        return replace(empty, note="; ".join(notes))
    try:
        law, laws, choice = fit(fitted, fittable, n0, noise_)
    except ValueError as e:
        return replace(empty, note=f"the law could not be fitted without the held-out trials: {e}")
    rng = np.random.default_rng(1)
    checks = []
    for s in fittable:
        for r in held[s]:
            guess, span = predicted(law, laws, s, r, noise_, rng)
            sd = noise_.sd(len(r.seeds))
            measured = final(r)
            checks.append(
                Check(
                    s,
                    r.name,
                    r.flops,
                    r.samples,
                    guess,
                    span,
                    measured,
                    sd,
                    len(r.seeds),
                    guess - measured,
                    span[0] <= measured <= span[1],
                )
            )
    errors = [abs(c.error) for c in checks]
    return Backtest(
        tuple(sorted(names)),
        tuple(r.name for r in fitted),
        law,
        choice,
        tuple(checks),
        float(np.mean(errors)) if errors else None,
        max(errors) if errors else None,
        sum(c.covered for c in checks),
        "; ".join(notes),
    )
