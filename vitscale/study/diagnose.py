"""Trials a law should not take at their word, found before it is fitted.

short           its full length is below MIN_STEPS optimizer steps: a run that short is mostly
                warm-up and the first fast drop, a regime the law's power in D does not describe
unstable        its seeds disagree by more than SPREAD times one seed's binomial error (the test
                split alone would make them agree within it), or a point's loss is not finite, or its
                training loss was not finite at the study's rate (it was trained again at half:
                runner.run_seed)
not improving   an annealed point below an earlier (shorter) one by more than twice their
                combined binomial error: more training made it worse

What follows a flag: a trial not improving with length, or with a loss that is not finite, is left
out of the fits (its points do not describe the curve the law assumes), unless it is a base, which
every law is relative to; a trial whose seeds disagree gets another seed where the study is running
(runner.py), and stays in; so does one trained again at half its rate, its loss not finite at the
first. A short trial stays in, flagged. The report lists every flag and what followed it.
"""

from __future__ import annotations

import math

import numpy as np

from vitscale.study.config import is_base
from vitscale.study.results import TrialResult
from vitscale.study.summary import Flag, Noise

MIN_STEPS = 500
SPREAD = 3.0
UNRESOLVED = 0.02  # a study whose seed noise is above this cannot tell apart trials closer than it


def _unstable(r: TrialResult) -> str:
    if any(s.halved for s in r.seeds):
        return (f"its training loss diverged (NaN or infinite) at base_lr {2 * r.lr:g}: trained again at "
                f"half the rate, {r.lr:g} (half-lr/ in its seeds' folders)")
    if any(p.loss is not None and not math.isfinite(p.loss) for s in r.seeds for p in s.points):
        return "a loss that is not finite"
    if len(r.seeds) < 2:
        return ""
    acc = [s.final.accuracy for s in r.seeds]
    spread, binomial = float(np.std(acc, ddof=1)), float(np.median([s.final.stderr for s in r.seeds]))
    if spread > SPREAD * binomial:
        return (
            f"its seeds' final accuracies ({', '.join(f'{100 * a:.1f}' for a in acc)}) spread by "
            f"{100 * spread:.1f} points, over {SPREAD:g}x one seed's binomial error ({100 * binomial:.1f})"
        )
    return ""


def _falling(r: TrialResult) -> str:
    pts = r.points()
    for i, early in enumerate(pts):
        for late in pts[i + 1 :]:
            if late.accuracy < early.accuracy - 2 * math.hypot(early.stderr, late.stderr):
                return (
                    f"{100 * late.accuracy:.1f}% at {late.fraction:g} of its budget, below "
                    f"{100 * early.accuracy:.1f}% at {early.fraction:g}"
                )
    return ""


def diagnose(rows: list[TrialResult]) -> tuple[Flag, ...]:
    """Every flag of every trial, in the trials' order, each saying whether it leaves its trial out
    of the fits."""
    flags = []
    for r in rows:
        base = is_base(r.name)
        if r.steps < MIN_STEPS:
            flags.append(Flag(r.name, "short", f"{r.steps} steps at its full length, below {MIN_STEPS}"))
        if why := _unstable(r):
            flags.append(Flag(r.name, "unstable", why, "not finite" in why and not base))
        if why := _falling(r):
            flags.append(Flag(r.name, "not improving", why, not base))
    return tuple(flags)


def fitted(rows: list[TrialResult], flags: tuple[Flag, ...]) -> list[TrialResult]:
    """The trials the fits take: all but those a flag leaves out."""
    out = {f.trial for f in flags if f.left_out}
    return [r for r in rows if r.name not in out]


def reseed(rows: list[TrialResult], flags: tuple[Flag, ...]) -> set[str]:
    """The trials whose seeds disagree (not a loss that is not finite): each gets one more seed."""
    return {f.trial for f in flags if f.kind == "unstable" and not f.left_out}


def unresolved(noise_: Noise) -> str:
    """The report's warning where the seed noise is too large to resolve small differences."""
    if noise_.seed_sd <= UNRESOLVED:
        return ""
    return (
        f"One seed's final accuracy varies by {100 * noise_.seed_sd:.1f} points between seeds: this study "
        f"does not resolve differences between trials smaller than that."
    )
