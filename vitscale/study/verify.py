"""Verifying the pick: the law's recommended shape trained at the budget it was recommended for, at
SEEDS seeds, and its measured accuracy set against the prediction and its interval. With
study.verify_ahead, the law's pick at those multiples of the budget too: a forecast beyond the
compute the study measured, checked by measuring it.

A pick whose shape a trial already measured at the budget is verified by that trial's seeds,
nothing trained. A verification trial trains the full length only (no cooldown branches below it),
in trials/verify-NAME[-at-Mx]/, and never enters the fits: it judges them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from vitscale.common import records
from vitscale.common.errors import UserError
from vitscale.models.vit import ViTConfig
from vitscale.study.lawfit import recipe_of
from vitscale.study.results import SeedResult, TrialResult
from vitscale.study.summary import Candidate, Summary, Verification
from vitscale.study.trials import Trial, branches

SEEDS = 2

logger = logging.getLogger(__name__)


def targets(study, summary: Summary) -> list[Candidate]:
    """The candidates to verify: the pick at the budget, then the law's best at each verify_ahead
    multiple (those the recommendation could place)."""
    rec = summary.recommendation
    if not study.verify or rec.pick is None:
        return []
    ahead = [c for m in study.verify_ahead for c in rec.ahead if c.multiple == m]
    return [rec.pick, *ahead]


def measured_by(c: Candidate, rows: list[TrialResult]) -> TrialResult | None:
    """The trial that already measured candidate c's shape at its budget (None: c needs training)."""
    if c.multiple != 1:
        return None
    return next((r for r in rows if recipe_of(r.family) == recipe_of(c.strategy)
                 and records.from_dict(ViTConfig, r.model) == c.model), None)


def trial_for(c: Candidate, trials: list[Trial]) -> Trial:
    """The verification trial of candidate c: its family's base run with c's shape."""
    recipe = recipe_of(c.strategy)
    base = next(t for t in trials if t.name == (f"base+{recipe}" if recipe else "base"))
    m = c.model
    at = f"-at-{c.multiple:g}x" if c.multiple != 1 else ""
    run = replace(base.run, model=m, data=replace(base.run.data, image_size=m.hw[0], frames=m.frames))
    return Trial(f"verify-{c.name}{at}", (c.strategy,), c.factor, c.factor, run, base.rates)


def check(c: Candidate, trial: str, steps: int, accuracies: list[float], trained: bool) -> Verification:
    """Candidate c's prediction against the mean of what `trial`'s seeds measured in `steps` steps."""
    mean = float(np.mean(accuracies))
    return Verification(c.multiple, trial, c.strategy, steps, c.accuracy, c.interval, tuple(accuracies),
                        mean, c.interval[0] <= mean <= c.interval[1], trained)


def run(study, summary: Summary, trials: list[Trial], rows: list[TrialResult], map_, size, job):
    """`summary` with its pick (and verify_ahead's) trained and measured: `size(study, trial)` sizes a
    trial (None: not sized), `job(study, trial, sizing, k)` is seed k's job for the launcher's
    `map_(jobs, done)` (which may only read what finished: --collect)."""
    checks, jobs, wanted = [], [], []
    whole = replace(study, fractions=(1.0,))  # a verification needs the full length only
    for c in targets(study, summary):
        if (r := measured_by(c, rows)) is not None:
            checks.append(check(c, r.name, r.steps, r.accuracies[:SEEDS], False))
            continue
        t = trial_for(c, trials)
        if not branches(c.steps, (1.0,), study.decay_frac):  # known before sizing (seconds, for a deep pick)
            logger.warning(f"the pick {t.name} is not verified: the budget buys it {c.steps} steps, too few "
                           "for a stable phase and a cooldown; raise --budget")
            continue
        try:
            sizing = size(whole, t)
        except UserError as e:  # e.g. a pick so large that the budget buys it no cooldown
            logger.warning(f"the pick {t.name} is not verified: {e}")
            continue
        if sizing is None:  # collected before it was sized: not verified yet
            continue
        sizing = replace(sizing, steps=round(sizing.steps * c.multiple))
        wanted.append((c, t, sizing.steps))
        jobs += [job(whole, t, sizing, k) for k in range(SEEDS)]
    got: dict[str, list[SeedResult]] = {}
    map_(jobs, lambda name, r: got.setdefault(r.trial, []).append(r) if r is not None else None)
    for c, t, steps in wanted:
        if seeds := sorted(got.get(t.name, []), key=lambda s: s.seed):
            checks.append(check(c, t.name, steps, [s.final.accuracy for s in seeds], True))
            logger.info(f"verified {t.name}: {100 * checks[-1].mean:.1f}% measured, {100 * c.accuracy:.1f}% "
                        f"predicted ({100 * c.interval[0]:.1f}-{100 * c.interval[1]:.1f})")
    return replace(summary, verified=tuple(checks))
