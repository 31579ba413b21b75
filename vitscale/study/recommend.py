"""The recommendation: for a compute or time budget, each strategy's best size (and so length)
under the law refitted on every trial; candidates within noise tie and the cheapest is named;
beside it, the best trial measured within the budget, and the law's frontier over compute."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from vitscale.common import records
from vitscale.cost.scaling import Scaled, scale_family
from vitscale.models.vit import ViTConfig
from vitscale.study import fits
from vitscale.study.config import StudyConfig
from vitscale.study.lawfit import FIT_FROM, SHARED, Z, base_trial, interval, labelled, predictions, recipe_of
from vitscale.study.results import TrialResult
from vitscale.study.summary import Candidate, FrontierPoint, Noise, Recommendation

FACTORS = tuple(2 ** (i / 8) for i in range(-16, 81))  # shapes the law chooses among: 1/4x to 1024x flops


# ----------------------------------------------------------------------------- recommendation
class Shapes:
    """Every strategy's shapes on the FACTORS grid, with what training one costs (a recipe's
    families scaled from its base, at its training cost per forward multiply-add)."""

    def __init__(
        self, rows: list[TrialResult], strategies: tuple[str, ...], runtime: fits.RuntimeModel | None
    ):
        recipes = dict.fromkeys(recipe_of(s) for s in strategies)
        self.bases = {g: records.from_dict(ViTConfig, base_trial(rows, g).model) for g in recipes}
        self.family: dict[str, list[Scaled]] = {
            s: scale_family(self.bases[recipe_of(s)], s.partition("+")[0], list(FACTORS)) for s in strategies
        }
        mine = {g: [r for r in rows if recipe_of(r.family) == g] or rows for g in recipes}
        self.ratios = {  # train / forward
            g: float(np.median([r.train_flops_per_sample / r.flops for r in rs])) for g, rs in mine.items()
        }
        self.batch = rows[0].batch
        self.smallests = {g: min(r.flops for r in rs) for g, rs in mine.items()}
        self.runtime = runtime

    def ratio(self, strategy: str) -> float:
        return self.ratios[recipe_of(strategy)]

    def smallest(self, strategy: str) -> float:
        return self.smallests[recipe_of(strategy)]

    def name(self, strategy: str, m: Scaled) -> str:
        g = recipe_of(strategy)
        if m.config == self.bases[g]:
            return f"base+{g}" if g else "base"
        return f"{strategy}-x{m.achieved:.3g}"

    def seconds_per_sample(self, m: Scaled) -> float:
        if self.runtime is None:
            return float("nan")
        return max(float(self.runtime.predict(m.cost.flops, m.cost.acts)), 1e-12)

    def samples(self, strategy: str, m: Scaled, kind: str, amount: float) -> float:
        """Training samples a budget buys for shape m of `strategy`."""
        if kind == "time":
            return amount / self.seconds_per_sample(m)
        return amount / (self.ratio(strategy) * m.cost.flops)


def _candidate(
    shapes: Shapes,
    law: fits.Laws,
    laws: list[fits.Laws],
    s: str,
    m: Scaled,
    d: float,
    noise_: Noise,
    span: tuple[float, float, float, float],
    rng,
    multiple: float = 1.0,
) -> Candidate:
    acc = 1.0 - float(law.predict(s, m.cost.flops, d))
    n_lo, n_hi, d_lo, d_hi = span
    outside = not (n_lo * 0.99 <= m.cost.flops <= n_hi * 1.01 and d_lo * 0.99 <= d <= d_hi * 1.01)
    return Candidate(
        s,
        shapes.name(s, m),
        m.achieved,
        m.config,
        m.cost.params,
        m.cost.flops,
        round(d / shapes.batch),
        round(d),
        d * shapes.ratio(s) * m.cost.flops,
        d * shapes.seconds_per_sample(m),
        acc,
        # for one run scored on the study's split, whose common sampling error the refits share
        interval(predictions(laws, s, m.cost.flops, d, noise_.binomial), noise_.seed_sd, rng, noise_.dof),
        outside,
        multiple,
        law.law(s).at_bounds(),
    )


def optimum(
    shapes: Shapes, law: fits.Laws, s: str, kind: str, amount: float
) -> tuple[Scaled, float] | None:
    """Strategy s's best shape under the law for a budget, and the samples it trains on. Never
    smaller than the smallest trial: below it the size term grows without a measurement to hold it."""
    options = []
    for m in shapes.family[s]:
        if m.cost.flops < shapes.smallest(s) * 0.99:
            continue
        d = shapes.samples(s, m, kind, amount)
        if math.isfinite(d) and d >= shapes.batch:
            options.append((float(law.predict(s, m.cost.flops, d)), m, d))
    if not options:
        return None
    _, m, d = min(options, key=lambda o: o[0])
    return m, d


def _ties(best: Candidate, others: list[Candidate], spread, sd: float) -> list[Candidate]:
    """Candidates whose accuracy one run at each could not tell from the best's (at LEVEL)."""
    return [
        c for c in others if best.accuracy - c.accuracy <= Z * math.sqrt(spread(best, c) ** 2 + 2 * sd**2)
    ]


def _cheapest(cands: list[Candidate]) -> Candidate:
    """Training time first (compute where time is unknown), then inference multiply-adds."""
    return min(cands, key=lambda c: (c.seconds if math.isfinite(c.seconds) else c.compute, c.flops))


def _budget(study: StudyConfig, rows: list[TrialResult]) -> tuple[str, float, str]:
    """(kind, amount, words) of the budget to recommend for: `target`, or the study's own."""
    b = study.parsed_target or study.parsed_budget
    if b.kind == "time":
        return "time", b.amount, f"{b.amount:.0f} s of training"
    if b.kind == "compute" and not b.in_epochs:
        return "compute", b.amount, f"{b.amount:.3g} multiply-adds of training"
    top = max(rows, key=lambda r: r.compute)
    what = (
        "the study's compute per trial"
        if b.kind == "compute"
        else f"what its largest trial ({top.name}) spent"
    )
    return "compute", top.compute, f"{top.compute:.3g} multiply-adds of training ({what})"


def _measured(rows: list[TrialResult], kind: str, amount: float, noise_: Noise) -> list[Candidate]:
    """Every trial's annealed points within the budget, as candidates."""
    out = []
    for r in rows:
        model = records.from_dict(ViTConfig, r.model)
        seeds = {}
        for s in r.seeds:
            for p in s.points:
                seeds[p.fraction] = seeds.get(p.fraction, 0) + 1
        for p in r.points():
            spent = p.seconds if kind == "time" else p.compute
            if spent <= amount * (1 + 1e-6):
                sd = noise_.sd(seeds[p.fraction])
                out.append(
                    Candidate(
                        r.family,
                        r.name,
                        r.achieved,
                        model,
                        r.params,
                        r.flops,
                        p.steps,
                        p.samples,
                        p.compute,
                        p.seconds,
                        p.accuracy,
                        (p.accuracy - Z * sd, p.accuracy + Z * sd),
                        False,
                    )
                )
    return out


def _measured_pick(rows: list[TrialResult], kind: str, amount: float, words: str,
                   noise_: Noise) -> Recommendation:
    """The recommendation as measured alone: the best annealed point within the budget (every
    point where none is within it), and the cheapest within noise of it; no law's pick yet."""
    measured = _measured(rows, kind, amount, noise_) or _measured(rows, "compute", math.inf, noise_)
    m_best = max(measured, key=lambda c: c.accuracy)

    def m_spread(a: Candidate, b: Candidate) -> float:
        """Noise of a difference: two points of one trial share their seeds' luck and, scored on the
        same items, the common part of their sampling error (only the rest tells them apart); two
        trials differ by each one's noise (seed_sd: seed to seed on the same items)."""
        if a.name == b.name:
            return math.sqrt(2 * (1 - SHARED)) * noise_.binomial
        return math.hypot((a.interval[1] - a.accuracy) / Z, (b.interval[1] - b.accuracy) / Z)

    m_tied = [m_best] + [c for c in _ties(m_best, [c for c in measured if c is not m_best], m_spread, 0.0)]
    return Recommendation(
        words,
        amount if kind == "compute" else None,
        amount if kind == "time" else None,
        None,
        None,
        (),
        _cheapest(m_tied),
        m_best,
        tuple(m_tied),
        (),
    )


def _frontier(rows: list[TrialResult], law: fits.Laws, shapes: Shapes) -> tuple[FrontierPoint, ...]:
    """Each strategy's best shape and length under the law at computes over the plotted range."""
    frontier = []
    ns_all = [p.compute for r in rows for p in r.points()]
    for c in np.geomspace(min(ns_all) / 2, 10 * max(ns_all), 30):
        for s in law.strategies:
            opt = optimum(shapes, law, s, "compute", float(c))
            if opt:
                m, d = opt
                frontier.append(
                    FrontierPoint(
                        s, float(c), m.achieved, m.cost.flops, d, 1.0 - float(law.predict(s, m.cost.flops, d))
                    )
                )
    return tuple(frontier)


def recommend(
    study: StudyConfig,
    rows: list[TrialResult],
    law: fits.Laws | None,
    laws: list[fits.Laws],
    noise_: Noise,
    runtime: fits.RuntimeModel | None,
) -> tuple[Recommendation, tuple[FrontierPoint, ...], Shapes | None]:
    """The recommendation for the study's budget (or target), the law's frontier, and the shapes
    the law chose among (None where no law was fitted)."""
    kind, amount, words = _budget(study, rows)
    rec = _measured_pick(rows, kind, amount, words, noise_)
    if law is None:
        return rec, (), None
    shapes = Shapes(rows, law.strategies, runtime)
    if kind == "time" and runtime is None:
        return rec, (), shapes
    pairs = labelled(rows, law.strategies)
    ns = [r.flops for r, _ in pairs]  # the ranges fitted
    ds = [p.samples for r, _ in pairs for s in r.seeds for p in s.points if p.fraction >= FIT_FROM]
    span = (min(ns), max(ns), min(ds), max(ds))
    rng = np.random.default_rng(2)

    def best_at(amount_: float, multiple: float = 1.0) -> list[Candidate]:
        out = []
        for s in law.strategies:
            opt = optimum(shapes, law, s, kind, amount_)
            if opt:
                out.append(_candidate(shapes, law, laws, s, *opt, noise_, span, rng, multiple))
        return sorted(out, key=lambda c: -c.accuracy)

    cands = best_at(amount)
    if not cands:
        return rec, (), shapes
    best = cands[0]

    def l_spread(a: Candidate, b: Candidate) -> float:  # the law's uncertainty about their difference
        if not laws:  # no refit could be made: the law's uncertainty is unknown, not zero
            return math.inf
        return float(
            np.std(
                predictions(laws, a.strategy, a.flops, a.samples)
                - predictions(laws, b.strategy, b.flops, b.samples)
            )
        )

    tied = [best] + _ties(best, cands[1:], l_spread, noise_.seed_sd)
    ahead = tuple(c[0] for m in sorted({*study.ahead, *study.verify_ahead}) if (c := best_at(m * amount, m)))
    pick = _cheapest(tied)
    note = (
        "The law's best size is the smallest measured: a smaller model may do better still at this budget; "
        "add factors below 1 (e.g. --factors 0.5,1,2,4) to find out."
        if pick.flops <= shapes.smallest(pick.strategy) * 1.01
        else ""
    )
    rec = replace(rec, pick=pick, best=best, tied=tuple(tied), ahead=ahead, note=note)
    return rec, _frontier(rows, law, shapes), shapes
