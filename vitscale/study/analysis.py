"""What a scaling study's trials say, every claim checked: summary.Summary.

points      every annealed point of every seed: (strategy, N, D, error), N the model's
            forward multiply-adds per sample, D the samples it trained on
law         error(s, N, D) = e + a (N/n0)^-alpha_s + b (D/d0)^-beta (N/n0)^-gamma  (fits.fit_law)
bootstrap   refits to trials resampled within each strategy, a random seed of each,
            each point moved by its validation sampling noise: the spread of a prediction
backtest    the law fitted without each strategy's largest trials predicts them
recommend   for a compute or time budget, each strategy's best size (and so length)
            under the law refitted on every trial; candidates within noise tie and the
            cheapest is named; beside it, the best trial measured within the budget
isoflops    trials at equal compute, measured, as a check of the law's optimum

A recipe's families (w+mr: strategy w under recipe mr, from its own base base+mr) are fitted
like strategies, each recipe's laws relative to its own base: a shared law is shared within a
recipe (a recipe may move the whole curve, which one law's common e, a, b could not say).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import numpy as np

from vitscale.common import records, stats
from vitscale.cost.scaling import Scaled, scale_family
from vitscale.models.vit import ViTConfig
from vitscale.study import fits
from vitscale.study.config import StudyConfig, base_run, is_base, parse_budget
from vitscale.study.results import SweepPoint, TrialResult
from vitscale.study.summary import (
    LEVEL,
    Backtest,
    Candidate,
    Check,
    FrontierPoint,
    Growth,
    IsoFlop,
    Noise,
    Parameter,
    Recommendation,
    Runtime,
    Structure,
    Summary,
    Sweep,
)
from vitscale.study.trials import held_out, pick_lr

BOOTSTRAP = 200  # refits per interval
FACTORS = tuple(2 ** (i / 8) for i in range(-16, 81))  # shapes the law chooses among: 1/4x to 1024x flops
Z = 1.6449  # the normal quantile of LEVEL's two-sided interval


# ----------------------------------------------------------------------------- points and noise
def _recipe(family: str) -> str:
    """The recipe a family (or a trial's family) trains under: w+mr -> mr; "" for w and base."""
    return family.partition("+")[2]


def _groups(strategies: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The strategies by recipe (the plain ones first): each group scales from one base."""
    by: dict[str, list[str]] = {}
    for s in strategies:
        by.setdefault(_recipe(s), []).append(s)
    return [tuple(g) for g in by.values()]


def _labelled(rows: list[TrialResult], strategies: tuple[str, ...]) -> list[tuple[TrialResult, str]]:
    """(trial, strategy) pairs: a trial once per strategy it belongs to, a base once (every
    strategy's law agrees at the base's size)."""
    pairs = []
    for r in rows:
        mine = [s for s in strategies if s in r.strategies]
        pairs += [(r, s) for s in (mine[:1] if is_base(r.name) else mine)]
    return pairs


def _points(
    pairs, rng: np.random.Generator | None = None, luck: float = 0.0
) -> tuple[list, list, list, list]:
    """Annealed points as (strategy, N, D, error) columns. With `rng`: each fraction's value from a
    random seed of those that ran it, moved by its validation sampling noise; where one seed ran
    it, moved also by a draw of the seed-to-seed spread `luck` (one per trial, as a seed's luck
    lasts its whole run)."""
    rows = []
    for r, s in pairs:
        shift = rng.normal(0.0, luck) if rng is not None and luck else 0.0
        by_fraction: dict[float, list] = {}
        for seed in r.seeds:
            for p in seed.points:
                by_fraction.setdefault(p.fraction, []).append(p)
        for ps in by_fraction.values():
            if rng is None:
                rows += [(s, r.flops, p.samples, 1.0 - p.accuracy) for p in ps]
                continue
            p = ps[rng.integers(len(ps))]
            moved = p.accuracy + rng.normal(0.0, p.stderr) + (shift if len(ps) == 1 else 0.0)
            rows.append((s, r.flops, p.samples, 1.0 - moved))
    return tuple(list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [])


def noise(rows: list[TrialResult]) -> Noise:
    """Seed-to-seed spread of final accuracy, pooled over trials with two or more seeds
    (validation sampling included); the binomial error alone where no trial has two."""
    ss, dof = 0.0, 0
    for r in rows:
        acc = [s.final.accuracy for s in r.seeds]
        if len(acc) > 1:
            ss += float(np.sum((np.asarray(acc) - np.mean(acc)) ** 2))
            dof += len(acc) - 1
    binomial = float(np.median([s.final.stderr for r in rows for s in r.seeds]))
    sd = max(math.sqrt(ss / dof), binomial) if dof else binomial
    return Noise(sd, dof, binomial)


def _final(r: TrialResult) -> float:
    """Mean over seeds of the full-length annealed point (the fitted metric)."""
    return r.points()[-1].accuracy


# ----------------------------------------------------------------------------- fitting
def _base(rows: list[TrialResult], recipe: str = "") -> TrialResult:
    """The trial every strategy (under `recipe`) scales from (the smallest where none is named base)."""
    mine = [r for r in rows if _recipe(r.family) == recipe] or rows
    name = f"base+{recipe}" if recipe else "base"
    return next((r for r in rows if r.name == name), None) or min(mine, key=lambda r: r.flops)


def _n0s(rows: list[TrialResult]) -> dict[str, float]:
    """Each recipe's base size ("" the study's base): what the laws of its families are relative to."""
    return {g: _base(rows, g).flops for g in dict.fromkeys(_recipe(r.family) for r in rows)}


def _able(rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float]) -> tuple[str, ...]:
    """The strategies with a trial of another size than their base (a law can be fitted for them)."""
    return tuple(
        s for s in strategies if any(s in r.strategies and r.flops != n0.get(_recipe(s)) for r in rows)
    )


def _pairs(rows: list[TrialResult], strategies: tuple[str, ...], shared: bool) -> list[list]:
    """The (trial, strategy) pairs of each law: one list per recipe for a shared law, one per
    strategy (each with its base) otherwise."""
    if shared:
        return [_labelled(rows, g) for g in _groups(strategies)]
    return [[(r, s) for r in rows if s in r.strategies] for s in strategies]


def _fit_once(groups: list[list], n0: dict[str, float], start: fits.Laws | None = None, rng=None,
              luck: float = 0.0):
    return fits.Laws(
        tuple(
            fits.fit_law(*_points(g, rng, luck), n0=n0[_recipe(g[0][1]) if g else ""],
                         start=start.laws[i] if start else None)
            for i, g in enumerate(groups)
        )
    )


def structure(rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float]) -> Structure:
    """Shared or separate laws, whichever predicts each trial larger than the base better from
    the others (leave-one-trial-out mean absolute error of its final accuracy; below the base
    the size term is an extrapolation the study never asks for); shared on a tie or where the
    separate laws cannot be fitted (an error is None where a structure predicts nothing)."""
    errors: dict[bool, float | None] = {}
    for shared in (True, False):
        try:
            full = _fit_once(_pairs(rows, strategies, shared), n0)
        except ValueError:
            errors[shared] = None
            continue
        misses = []
        for r in rows:
            if r.flops <= n0[_recipe(r.family)]:  # predict larger trials from the rest, as the backtest does
                continue
            others = [x for x in rows if x is not r]
            s = next(t for t in strategies if t in r.strategies)
            try:
                law = _fit_once(_pairs(others, strategies, shared), n0, start=full)
            except ValueError:
                continue
            misses.append(abs(1.0 - float(law.predict(s, r.flops, r.samples)) - _final(r)))
        errors[shared] = float(np.mean(misses)) if misses else None
    separate_better = errors[False] is not None and (errors[True] is None or errors[False] < errors[True])
    return Structure(not separate_better, errors[True], errors[False])


def fit(
    rows: list[TrialResult], strategies: tuple[str, ...], n0: dict[str, float], noise_: Noise | None = None
) -> tuple[fits.Laws, list[fits.Laws], Structure]:
    """The laws on every annealed point of `rows` (structure chosen by `structure`), their
    bootstrap refits, and the structure's choice."""
    choice = structure(rows, strategies, n0)
    luck = math.sqrt(max(noise_.seed_sd**2 - noise_.binomial**2, 0.0)) if noise_ else 0.0
    law = _fit_once(_pairs(rows, strategies, choice.shared), n0)
    rng = np.random.default_rng(0)
    anchors = {g: [r for r in rows if _recipe(r.family) == g and r.flops == n] for g, n in n0.items()}
    groups = {s: [r for r in rows if s in r.strategies and r.flops != n0[_recipe(s)]] for s in strategies}
    laws = []
    for _ in range(BOOTSTRAP):
        drawn = {s: [g[i] for i in rng.integers(0, len(g), len(g))] for s, g in groups.items()}
        if choice.shared:
            pairs = [[(r, ss[0]) for r in anchors[_recipe(ss[0])]] + [(r, s) for s in ss for r in drawn[s]]
                     for ss in _groups(strategies)]
        else:
            pairs = [[(r, s) for r in anchors[_recipe(s)] + g] for s, g in drawn.items()]
        try:
            laws.append(_fit_once(pairs, n0, start=law, rng=rng, luck=luck))
        except ValueError:
            continue
    return law, laws, choice


def _interval(draws: np.ndarray, sd: float, rng: np.random.Generator, dof: int = 0) -> tuple[float, float]:
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


def _predict(laws: list[fits.Laws], strategy: str, n: float, d: float) -> np.ndarray:
    return np.array([1.0 - float(lw.predict(strategy, n, d)) for lw in laws])


# ----------------------------------------------------------------------------- backtest
def backtest(rows: list[TrialResult], strategies: tuple[str, ...], holdout: int, noise_: Noise) -> Backtest:
    """Fit without the held-out trials, predict each one's final accuracy with an interval."""
    held = held_out(rows, strategies, holdout)
    names = {r.name for rs in held.values() for r in rs}
    fitted = [r for r in rows if r.name not in names]
    n0 = _n0s(rows)
    able = _able(fitted, strategies, n0)
    notes = [
        f"{s} keeps no trial but the base once its largest is held out, so it is not backtested"
        for s in strategies
        if s not in able and held[s]
    ]
    empty = Backtest(tuple(sorted(names)), tuple(r.name for r in fitted), None, None, (), None, None, 0, "")
    if not names:
        return replace(empty, note="nothing held out (holdout 0)" if not holdout else
                       "no trial but a base has finished, so none is held out")
    if not able:
        return replace(empty, note="; ".join(notes))
    try:
        law, laws, choice = fit(fitted, able, n0, noise_)
    except ValueError as e:
        return replace(empty, note=f"the law could not be fitted without the held-out trials: {e}")
    rng = np.random.default_rng(1)
    checks = []
    for s in able:
        for r in held[s]:
            predicted = 1.0 - float(law.predict(s, r.flops, r.samples))
            sd = noise_.sd(len(r.seeds))
            interval = _interval(_predict(laws, s, r.flops, r.samples), sd, rng, noise_.dof)
            measured = _final(r)
            checks.append(
                Check(
                    s,
                    r.name,
                    r.flops,
                    r.samples,
                    predicted,
                    interval,
                    measured,
                    sd,
                    len(r.seeds),
                    predicted - measured,
                    interval[0] <= measured <= interval[1],
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


# ----------------------------------------------------------------------------- recommendation
class _Shapes:
    """Every strategy's shapes on the FACTORS grid, with what training one costs (a recipe's
    families scaled from its base, at its training cost per forward multiply-add)."""

    def __init__(
        self, rows: list[TrialResult], strategies: tuple[str, ...], runtime: fits.RuntimeModel | None
    ):
        recipes = dict.fromkeys(_recipe(s) for s in strategies)
        self.bases = {g: records.from_dict(ViTConfig, _base(rows, g).model) for g in recipes}
        self.family: dict[str, list[Scaled]] = {
            s: scale_family(self.bases[_recipe(s)], s.partition("+")[0], list(FACTORS)) for s in strategies
        }
        mine = {g: [r for r in rows if _recipe(r.family) == g] or rows for g in recipes}
        self.ratios = {  # train / forward
            g: float(np.median([r.train_flops_per_sample / r.flops for r in rs])) for g, rs in mine.items()
        }
        self.batch = rows[0].batch
        self.smallests = {g: min(r.flops for r in rs) for g, rs in mine.items()}
        self.runtime = runtime

    def ratio(self, strategy: str) -> float:
        return self.ratios[_recipe(strategy)]

    def smallest(self, strategy: str) -> float:
        return self.smallests[_recipe(strategy)]

    def name(self, strategy: str, m: Scaled) -> str:
        g = _recipe(strategy)
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
    shapes: _Shapes,
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
        records.to_dict(m.config),
        m.cost.params,
        m.cost.flops,
        round(d / shapes.batch),
        round(d),
        d * shapes.ratio(s) * m.cost.flops,
        d * shapes.seconds_per_sample(m),
        acc,
        _interval(_predict(laws, s, m.cost.flops, d), noise_.seed_sd, rng, noise_.dof),
        outside,
        multiple,
    )


def _optimum(
    shapes: _Shapes, law: fits.Laws, s: str, kind: str, amount: float
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
    b = parse_budget(study.target or study.budget)
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
                        r.model,
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


def recommend(
    study: StudyConfig,
    rows: list[TrialResult],
    law: fits.Laws | None,
    laws: list[fits.Laws],
    noise_: Noise,
    runtime: fits.RuntimeModel | None,
) -> tuple[Recommendation, tuple[FrontierPoint, ...], _Shapes | None]:
    kind, amount, words = _budget(study, rows)
    measured = _measured(rows, kind, amount, noise_) or _measured(rows, "compute", math.inf, noise_)
    m_best = max(measured, key=lambda c: c.accuracy)

    def m_spread(a: Candidate, b: Candidate) -> float:
        """Noise of a difference: two points of one trial share their seeds' luck (only
        validation sampling tells them apart); two trials differ by each one's noise."""
        if a.name == b.name:
            return math.sqrt(2) * noise_.binomial
        return math.hypot((a.interval[1] - a.accuracy) / Z, (b.interval[1] - b.accuracy) / Z)

    m_tied = [m_best] + [c for c in _ties(m_best, [c for c in measured if c is not m_best], m_spread, 0.0)]
    rec = Recommendation(
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
    if law is None:
        return rec, (), None
    shapes = _Shapes(rows, law.strategies, runtime)
    if kind == "time" and runtime is None:
        return rec, (), shapes
    pairs = _labelled(rows, law.strategies)
    ns, ds = [r.flops for r, _ in pairs], [p.samples for r, _ in pairs for s in r.seeds for p in s.points]
    span = (min(ns), max(ns), min(ds), max(ds))
    rng = np.random.default_rng(2)

    def best_at(amount_: float, multiple: float = 1.0) -> list[Candidate]:
        out = []
        for s in law.strategies:
            opt = _optimum(shapes, law, s, kind, amount_)
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
                _predict(laws, a.strategy, a.flops, a.samples)
                - _predict(laws, b.strategy, b.flops, b.samples)
            )
        )

    tied = [best] + _ties(best, cands[1:], l_spread, noise_.seed_sd)
    ahead = tuple(c[0] for m in study.ahead if (c := best_at(m * amount, m)))
    frontier = []
    ns_all = [p.compute for r in rows for p in r.points()]
    for c in np.geomspace(min(ns_all) / 2, 10 * max(ns_all), 30):  # the plotted range
        for s in law.strategies:
            opt = _optimum(shapes, law, s, "compute", float(c))
            if opt:
                m, d = opt
                frontier.append(
                    FrontierPoint(
                        s, float(c), m.achieved, m.cost.flops, d, 1.0 - float(law.predict(s, m.cost.flops, d))
                    )
                )
    pick = _cheapest(tied)
    note = (
        "The law's best size is the smallest measured: a smaller model may do better still at this budget; "
        "add factors below 1 (e.g. --factors 0.5,1,2,4) to find out."
        if pick.flops <= shapes.smallest(pick.strategy) * 1.01
        else ""
    )
    rec = replace(rec, pick=pick, best=best, tied=tuple(tied), ahead=ahead, note=note)
    return rec, tuple(frontier), shapes


# ----------------------------------------------------------------------------- isoflops
def _at(r: TrialResult, compute: float, tolerance: float = 0.1) -> tuple[float, float] | None:
    """A trial's (samples, accuracy) at `compute`: between its annealed points, linear in log
    compute; up to `tolerance` beyond its first or last point, that point's."""
    pts = r.points()
    cs = np.log([p.compute for p in pts])
    x = math.log(compute)
    if not cs[0] - tolerance <= x <= cs[-1] + tolerance:
        return None
    acc = float(np.interp(x, cs, [p.accuracy for p in pts]))
    return compute / r.train_flops_per_sample, acc


def isoflops(rows: list[TrialResult], law: fits.Laws | None, shapes: _Shapes | None) -> tuple[IsoFlop, ...]:
    """Profiles where three or more trials meet: at the computes of the base's annealed points
    (under a compute budget, every trial's), and at powers of two of its full compute."""
    base = _base(rows)
    out = []
    budgets: list[float] = []
    for c in sorted([p.compute for p in base.points()] + [base.compute * 2.0**k for k in range(-4, 8)]):
        if not budgets or c > budgets[-1] * 1.05:  # the base's annealed points, powers of two of its budget
            budgets.append(c)
    for c in budgets:
        at = [(r, v) for r in rows if (v := _at(r, c))]
        if len({r.flops for r, _ in at}) < 3:
            continue
        strategies = [r.family for r, _ in at]
        predicted = tuple(
            1.0 - float(law.predict(ls, r.flops, d)) if law and (ls := law.strategy_of(r.family)) else None
            for r, (d, _) in at
        )
        law_best, law_flops = "", None
        if law and shapes:
            opts = [(s, o) for s in law.strategies if (o := _optimum(shapes, law, s, "compute", c))]
            if opts:
                s, (m, d) = min(opts, key=lambda o: float(law.predict(o[0], o[1][0].cost.flops, o[1][1])))
                law_best, law_flops = shapes.name(s, m), m.cost.flops
        best = max(at, key=lambda rv: rv[1][1])[0].name
        out.append(
            IsoFlop(
                c,
                tuple(r.name for r, _ in at),
                tuple(strategies),
                tuple(r.flops for r, _ in at),
                tuple(d for _, (d, _) in at),
                tuple(a for _, (_, a) in at),
                predicted,
                best,
                law_best,
                law_flops,
            )
        )
    return tuple(out)


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
    return Sweep(
        tuple(sweep),
        pick_lr(sweep).lr,
        compute,
        trials,
        compute / trials if trials else float("nan"),
        sum(p.wall_s for p in sweep),
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
    """Backtest first (fits without the held-out trials), then the law refitted on every trial
    for the recommendation, the frontier and the IsoFLOP check."""
    noise_ = noise(rows)
    strategies = tuple(study.families)
    bt = backtest(rows, strategies, study.holdout, noise_)
    n0 = _n0s(rows)
    able = _able(rows, strategies, n0)
    law, laws, choice = None, [], None
    if able:  # a law needs a trial of another size than its base (--collect with the base alone has none)
        with contextlib.suppress(ValueError):  # too few points for its parameters
            law, laws, choice = fit(rows, able, n0, noise_)
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
    split = "test" if base_run(study).data.has_test else "val"  # what final accuracies are measured on
    return Summary(
        study.budget,
        parse_budget(study.budget).kind,
        study.objective,
        study.param,
        f"linear-probe {split} top-1" if study.objective == "mae" else f"{split} top-1",
        note,
        strategies,
        len(rows),
        sum(r.wall_s for r in rows),
        noise_,
        bt,
        law,
        choice,
        _parameters(law, laws) if law else (),
        rec,
        frontier,
        isoflops(rows, law, shapes),
        _sweep(list(sweep), rows),
        rt,
        growth,
    )
