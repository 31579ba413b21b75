"""A study's trials as the points a law is fitted to, their noise, and the law fitted with its
bootstrap: what the backtest, the recommendation and the IsoFLOP check share.

points      every annealed point of every seed: (strategy, N, D, error), N the model's
            forward multiply-adds per sample, D the samples it trained on
law         error(s, N, D) = e + a (N/n0)^-alpha_s + b (D/d0)^-beta (N/n0)^-gamma  (fits.fit_law)
bootstrap   refits to trials resampled within each strategy, a random seed of each,
            each point moved by its test sampling noise (a share of it common to every point,
            see SHARED): the spread of a prediction

A recipe's families (w+mr: strategy w under recipe mr, from its own base base+mr) are fitted
like strategies, each recipe's laws relative to its own base: a shared law is shared within a
recipe (a recipe may move the whole curve, which one law's common e, a, b could not say).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitscale.study import fits
from vitscale.study.config import is_base
from vitscale.study.results import TrialResult
from vitscale.study.summary import LEVEL, Noise, Structure

BOOTSTRAP = 200  # refits per interval
Z = 1.6449  # the normal quantile of LEVEL's two-sided interval
# Share of a point's test sampling variance that every point of the study has in common. Every
# annealed point is scored on the same test (or validation) items, and models trained on the same
# data miss largely the same hard items, so their sampling errors correlate strongly (two cooldowns
# of one run more so); 0.8 is the correlation of per-item correctness such models typically show.
# A common error moves every point alike, which the law's free floor e follows one for one: it does
# not average out over points as independent errors do. It does cancel against a measurement on the
# same items (which the intervals here claim: what training that model again and scoring it on this
# split gives), and adds to one on other items (a model's true accuracy).
SHARED = 0.8
# Annealed points below this share of their trial's budget are measured (IsoFLOP slices, curves)
# but not fitted: a run's first tenth is warm-up and the first fast drop, which the law's power in
# D does not describe (Choshen et al. 2025 drop a run's first 10% for the same reason). On the
# demo's data, fitting the C/16 points too (some at chance) raised the size backtest's mean error
# from 2.1 to 3.4 points, the compute backtest's from 2.0 to 2.6.
FIT_FROM = 0.1


@dataclass(frozen=True)
class Refit(fits.Laws):
    """A bootstrap refit, with the common test-sampling error its points were moved by (in units of
    a point's binomial standard error): the same error moves any point measured on that split."""

    common: float = 0.0


# ----------------------------------------------------------------------------- points and noise
def recipe_of(family: str) -> str:
    """The recipe a family (or a trial's family) trains under: w+mr -> mr; "" for w and base."""
    return family.partition("+")[2]


def _groups(strategies: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The strategies by recipe (the plain ones first): each group scales from one base."""
    by: dict[str, list[str]] = {}
    for s in strategies:
        by.setdefault(recipe_of(s), []).append(s)
    return [tuple(g) for g in by.values()]


def labelled(rows: list[TrialResult], strategies: tuple[str, ...]) -> list[tuple[TrialResult, str]]:
    """(trial, strategy) pairs: a trial once per strategy it belongs to, a base once (every
    strategy's law agrees at the base's size)."""
    pairs = []
    for r in rows:
        mine = [s for s in strategies if s in r.strategies]
        pairs += [(r, s) for s in (mine[:1] if is_base(r.name) else mine)]
    return pairs


def points(
    pairs, rng: np.random.Generator | None = None, luck: float = 0.0, common: float = 0.0
) -> tuple[list, list, list, list]:
    """Annealed points as (strategy, N, D, error) columns. With `rng`: each fraction's value from a
    random seed of those that ran it, moved by its test sampling noise: `common` standard errors
    (the draw every point scored on the split shares) plus its own part, the rest of its variance
    (see SHARED); where one seed ran it, moved also by a draw of the seed-to-seed spread `luck`
    (one per trial, as a seed's luck lasts its whole run)."""
    rows = []
    own = math.sqrt(1.0 - SHARED)
    for r, s in pairs:
        shift = rng.normal(0.0, luck) if rng is not None and luck else 0.0
        by_fraction: dict[float, list] = {}
        for seed in r.seeds:
            for p in seed.points:
                if p.fraction >= FIT_FROM:
                    by_fraction.setdefault(p.fraction, []).append(p)
        for ps in by_fraction.values():
            if rng is None:
                rows += [(s, r.flops, p.samples, 1.0 - p.accuracy) for p in ps]
                continue
            p = ps[rng.integers(len(ps))]
            moved = p.accuracy + p.stderr * (common + own * rng.standard_normal())
            moved += shift if len(ps) == 1 else 0.0
            rows.append((s, r.flops, p.samples, 1.0 - moved))
    return tuple(list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])


def noise(rows: list[TrialResult]) -> Noise:
    """Seed-to-seed spread of final accuracy, pooled over trials with two or more seeds (the part of
    test sampling the seeds do not share included); the binomial error alone where no trial has two.
    `rows`: the trials a fit uses, never ones it is judged on (trials.held_out)."""
    ss, dof = 0.0, 0
    for r in rows:
        acc = [s.final.accuracy for s in r.seeds]
        if len(acc) > 1:
            ss += float(np.sum((np.asarray(acc) - np.mean(acc)) ** 2))
            dof += len(acc) - 1
    binomial = float(np.median([s.final.stderr for r in rows for s in r.seeds]))
    sd = max(math.sqrt(ss / dof), binomial) if dof else binomial
    return Noise(sd, dof, binomial)


def final(r: TrialResult) -> float:
    """Mean over seeds of the full-length annealed point (the fitted metric)."""
    return r.points()[-1].accuracy


# ----------------------------------------------------------------------------- fitting
def base_trial(rows: list[TrialResult], recipe: str = "") -> TrialResult:
    """The trial every strategy (under `recipe`) scales from (the smallest where none is named base)."""
    mine = [r for r in rows if recipe_of(r.family) == recipe] or rows
    name = f"base+{recipe}" if recipe else "base"
    return next((r for r in rows if r.name == name), None) or min(mine, key=lambda r: r.flops)


def n0s(rows: list[TrialResult]) -> dict[str, float]:
    """Each recipe's base size ("" the study's base): what the laws of its families are relative to."""
    return {g: base_trial(rows, g).flops for g in dict.fromkeys(recipe_of(r.family) for r in rows)}


def able(rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float]) -> tuple[str, ...]:
    """The strategies with a trial of another size than their base (a law can be fitted for them)."""
    return tuple(
        s for s in strategies if any(s in r.strategies and r.flops != n0.get(recipe_of(s)) for r in rows)
    )


def _pairs(rows: list[TrialResult], strategies: tuple[str, ...], shared: bool) -> list[list]:
    """The (trial, strategy) pairs of each law: one list per recipe for a shared law, one per
    strategy (each with its base) otherwise."""
    if shared:
        return [labelled(rows, g) for g in _groups(strategies)]
    return [[(r, s) for r in rows if s in r.strategies] for s in strategies]


def _fit_once(groups: list[list], n0: dict[str, float]) -> fits.Laws:
    """The laws of `groups` (one list of pairs per law) on their points, each from the grid of starts."""
    return fits.Laws(tuple(fits.fit_many([fits.points(*points(g), n0=_n0(g, n0))])[0] for g in groups))


def _n0(group: list, n0: dict[str, float]) -> float:
    return n0[recipe_of(group[0][1]) if group else ""]


def _refits(columns: list[list[tuple]], n0s_: list[float], start: fits.Laws) -> list[fits.Laws | None]:
    """Refits of `start` (one law per group) to sets of points, all solved as one batch per law:
    `columns[j][i]` holds set j's points of law i; None for a set whose points cannot be fitted."""
    sets: list[list[fits.Points] | None] = []
    for cols in columns:
        try:
            set_ = [fits.points(*c, n0=n) for c, n in zip(cols, n0s_, strict=True)]
        except ValueError:
            set_ = None
        # a set that lost every trial of a strategy has no exponent for it to fit
        same = set_ and all(p.names == law.strategies for p, law in zip(set_, start.laws, strict=True))
        sets.append(set_ if same else None)
    ok = [s for s in sets if s is not None]
    solved = [iter(fits.fit_many([s[i] for s in ok], start=law)) for i, law in enumerate(start.laws)]
    return [None if s is None else fits.Laws(tuple(next(it) for it in solved)) for s in sets]


def structure(rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float]) -> Structure:
    """Shared or separate laws, whichever predicts each trial larger than the base better from
    the others (leave-one-trial-out mean absolute error of its final accuracy; below the base
    the size term is an extrapolation the study never asks for); shared on a tie or where the
    separate laws cannot be fitted (an error is None where a structure predicts nothing)."""
    return _structure(rows, strategies, n0)[0]


def _structure(rows, strategies, n0) -> tuple[Structure, dict[bool, fits.Laws | None]]:
    """`structure`, and each structure's laws on every trial (None: not fitted), which `fit` keeps
    rather than fitting the chosen one again from the same grid of starts."""
    errors: dict[bool, float | None] = {}
    fulls: dict[bool, fits.Laws | None] = {True: None, False: None}
    for shared in (True, False):
        try:
            full = fulls[shared] = _fit_once(_pairs(rows, strategies, shared), n0)
        except ValueError:
            errors[shared] = None
            continue
        # predict the trials larger than their base from the rest, as the backtest does
        left = [r for r in rows if r.flops > n0[recipe_of(r.family)]]
        groups = [_pairs([x for x in rows if x is not r], strategies, shared) for r in left]
        units = [_n0(g, n0) for g in groups[0]] if groups else []
        laws = _refits([[points(g) for g in gs] for gs in groups], units, full)
        misses = []
        for r, law in zip(left, laws, strict=True):
            if law is not None:
                s = next(t for t in strategies if t in r.strategies)
                misses.append(abs(1.0 - float(law.predict(s, r.flops, r.samples)) - final(r)))
        errors[shared] = float(np.mean(misses)) if misses else None
    separate_better = errors[False] is not None and (errors[True] is None or errors[False] < errors[True])
    return Structure(not separate_better, errors[True], errors[False]), fulls


def fit(
    rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float], noise_: Noise | None = None
) -> tuple[fits.Laws, list[fits.Laws], Structure]:
    """The laws on every annealed point of `rows` (structure chosen by `structure`), their
    bootstrap refits, and the structure's choice. `noise_`: the seed-to-seed spread of `rows`."""
    choice, fulls = _structure(rows, strategies, n0)
    # a seed's luck: the seed-to-seed spread less the test sampling the seeds do not share
    own = (1.0 - SHARED) * noise_.binomial**2 if noise_ else 0.0
    luck = math.sqrt(max(noise_.seed_sd**2 - own, 0.0)) if noise_ else 0.0
    law = fulls[choice.shared] or _fit_once(_pairs(rows, strategies, choice.shared), n0)
    rng = np.random.default_rng(0)
    anchors = {g: [r for r in rows if recipe_of(r.family) == g and r.flops == n] for g, n in n0.items()}
    groups = {s: [r for r in rows if s in r.strategies and r.flops != n0[recipe_of(s)]] for s in strategies}
    sets, commons = [], []
    for _ in range(BOOTSTRAP):
        drawn = {s: [g[i] for i in rng.integers(0, len(g), len(g))] for s, g in groups.items()}
        if choice.shared:
            pairs = [[(r, ss[0]) for r in anchors[recipe_of(ss[0])]] + [(r, s) for s in ss for r in drawn[s]]
                     for ss in _groups(strategies)]
        else:
            pairs = [[(r, s) for r in anchors[recipe_of(s)] + g] for s, g in drawn.items()]
        commons.append(math.sqrt(SHARED) * rng.standard_normal())  # this refit's draw of the test split
        sets.append([points(g, rng, luck, commons[-1]) for g in pairs])
    refits = _refits(sets, [_n0(g, n0) for g in pairs], law)
    laws = [Refit(r.laws, c) for r, c in zip(refits, commons, strict=True) if r is not None]
    return law, laws, choice


def interval(draws: np.ndarray, sd: float, rng: np.random.Generator, dof: int = 0) -> tuple[float, float]:
    """LEVEL interval of accuracies `draws` (one per refit), each moved by noise of `sd`: Student's
    t with `dof` degrees of freedom where sd was estimated from that few seed pairs (a few pairs
    that happen to agree must not make the interval tight), normal where it is known (dof 0).
    NaNs where no refit could be made (fewer points than the law has parameters)."""
    if len(draws) == 0:
        return math.nan, math.nan
    z = rng.standard_t(dof, 10 * len(draws)) if dof else rng.standard_normal(10 * len(draws))
    spread = np.clip(np.repeat(draws, 10) + sd * z, 0.0, 1.0)
    q = (1 - LEVEL) / 2
    return float(np.quantile(spread, q)), float(np.quantile(spread, 1 - q))


def predictions(laws: list[fits.Laws], strategy: str, n: float, d: float, stderr: float = 0.0) -> np.ndarray:
    """Each refit's accuracy for (strategy, n, d), as a measurement on the study's split would see
    it: less the common sampling error the refit's points were moved by (a measurement on the same
    items shares it; `stderr`: such a measurement's binomial error). With stderr 0, the model's
    accuracy on items drawn afresh, which the common error does not cancel against."""
    return np.array([1.0 - float(lw.predict(strategy, n, d)) - getattr(lw, "common", 0.0) * stderr
                     for lw in laws])


def predicted(law: fits.Laws, laws: list[fits.Laws], strategy: str, r: TrialResult, noise_: Noise,
              rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    """The law's accuracy for trial `r` at its full length, and the LEVEL interval for what r
    measured there (the mean over its seeds): the refits' spread plus that mean's seed noise, on the
    split the fitted points were measured on (their common sampling error cancels)."""
    accuracy = 1.0 - float(law.predict(strategy, r.flops, r.samples))
    draws = predictions(laws, strategy, r.flops, r.samples, r.seeds[0].final.stderr)
    return accuracy, interval(draws, noise_.sd(len(r.seeds)), rng, noise_.dof)
