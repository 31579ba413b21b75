"""The study's analysis against known truths: a law that recovers the parameters points were
drawn from, a backtest that catches a wrong prediction, ties within noise, a recommendation
at the true compute-optimal size, IsoFLOP profiles, and summary.json read back as written."""

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import least_squares

from vitscale.common import records
from vitscale.cost.complexity import cost
from vitscale.cost.scaling import scale
from vitscale.study import analysis, fits, lawfit, summary
from vitscale.study.config import StudyConfig
from vitscale.study.results import Point, SeedResult, StaleResult, TrialResult
from vitscale.study.runner import extra_seeds
from vitscale.train import config

BASE = config.with_preset(config.recipe("train"), "pico/4").model.replace(image_size=16, num_classes=10)
N0 = cost(BASE).flops
TRUE = fits.Law(("d", "w"), 0.05, 0.3, (0.3, 0.6), 0.5, 0.4, 0.15, N0, 1e4, 0.0, 0)


@pytest.fixture(autouse=True)
def _few_refits(monkeypatch):
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 60)


@pytest.fixture
def _point_estimates(monkeypatch):
    """For a test that checks no interval and no tie (each refit costs a fit): enough refits to
    give the summary its intervals all the same."""
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 4)


def trial(
    strategy: str,
    factor: float,
    steps: int,
    law=TRUE,
    seeds=(0,),
    sd=0.0,
    rng=None,
    batch=10,
    fractions=(0.25, 0.5, 1.0),
    final=None,
) -> TrialResult:
    """A trial whose annealed points follow `law` (plus seed noise of `sd`), or end at `final`."""
    cfg = scale(BASE, strategy, factor)
    c = cost(cfg)
    name = "base" if factor == 1 else f"{strategy}-x{factor:g}"
    per_sample = 3.0 * c.flops
    out = []
    for k in seeds:
        points = []
        shift = rng.normal(0, sd) if sd else 0.0
        for f in fractions if k == 0 else (1.0,):
            s = round(f * steps)
            acc = 1 - float(law.predict(strategy, c.flops, s * batch)) + shift
            acc = final if f == 1.0 and final is not None else acc
            points.append(
                Point(
                    f,
                    s,
                    s * batch,
                    s * batch * per_sample,
                    s * batch * per_sample / 1e9,
                    acc,
                    None,
                    0.004,
                    True,
                )
            )
        out.append(SeedResult(name, k, tuple(points), (), 1.0, 1e9 / per_sample))
    return TrialResult(
        name,
        ("d", "w") if factor == 1 else (strategy,),
        factor,
        c.flops / N0,
        records.to_dict(cfg),
        c.params,
        c.flops,
        c.acts,
        batch,
        4e-3,
        steps,
        per_sample,
        {"samples_per_s": 1e9 / per_sample, "peak_mem_mb": 1.0},
        10000,
        tuple(out),
    )


def epochs_study(law=TRUE, sd=0.0, seed=0, steps=2000, **kw) -> list[TrialResult]:
    """Every trial the same length (an epochs budget); the largest of each strategy at two seeds."""
    rng = np.random.default_rng(seed)
    rows = [trial("d", 1, steps, law, sd=sd, rng=rng, **kw)]
    for s in ("d", "w"):
        for f in (2, 4, 8):
            rows.append(trial(s, f, steps, law, seeds=(0, 1) if f == 8 else (0,), sd=sd, rng=rng, **kw))
    return rows


# ----------------------------------------------------------------------------- the law
def _columns(rows):
    pairs = lawfit.labelled(rows, ("d", "w"))
    return lawfit.points(pairs)


def test_law_recovers_the_parameters_its_points_were_drawn_from():
    exact = fits.fit_law(*_columns(epochs_study()), n0=N0)
    assert (exact.e, exact.a, exact.b, exact.beta, exact.gamma) == pytest.approx(
        (0.05, 0.3, 0.5 * (exact.d0 / 1e4) ** -0.4, 0.4, 0.15), rel=1e-3
    )
    assert exact.alphas == pytest.approx((0.3, 0.6), rel=1e-3)
    noisy = fits.fit_law(*_columns(epochs_study(sd=0.003, seed=3)), n0=N0)
    assert noisy.alphas == pytest.approx((0.3, 0.6), abs=0.1)
    assert noisy.beta == pytest.approx(0.4, abs=0.05)
    assert noisy.rmse < 0.006


def test_law_is_as_good_as_scipy_least_squares():
    s, n, d, y = _columns(epochs_study(sd=0.004, seed=1))
    ours = fits.fit_law(s, n, d, y, n0=N0, huber=1.0)  # a Huber loss this wide is plain least squares
    which = np.array([s_ == "w" for s_ in s])
    n, d, y = map(np.asarray, (n, d, y))

    def residual(p):
        alpha = np.where(which, p[4], p[3])
        return p[0] + p[1] * (n / N0) ** -alpha + p[2] * (d / d.min()) ** -p[5] * (n / N0) ** -p[6] - y

    start, upper = [0.1, 0.2, 0.3, 0.5, 0.5, 0.5, 0.1], [1, 4, 4, 3, 3, 3, 3]
    fit = least_squares(residual, start, bounds=([0] * 7, upper))
    ours_sse = sum((ours.predict(si, ni, di) - yi) ** 2 for si, ni, di, yi in zip(s, n, d, y, strict=True))
    assert ours_sse <= 2 * fit.cost * (1 + 1e-4)


def test_law_needs_a_second_size_for_every_strategy():
    rows = [r for r in epochs_study() if r.name == "base" or "d" in r.strategies]
    with pytest.raises(ValueError, match="strategy w has no trial but the base"):
        fits.fit_law(*lawfit.points([(rows[0], "w"), *((r, "d") for r in rows[1:])]), n0=N0)


# ----------------------------------------------------------------------------- backtest
def test_backtest_predicts_the_held_out_trials_within_their_intervals():
    rows = epochs_study(sd=0.003, seed=4)
    bt = analysis.summarize(StudyConfig(strategies=("d", "w")), rows).backtest
    assert bt.held_out == ("d-x8", "w-x8") and "d-x8" not in bt.fitted_on
    assert [c.trial for c in bt.checks] == ["d-x8", "w-x8"]
    truth = {c.trial: 1 - float(TRUE.predict(c.strategy, c.flops, c.samples)) for c in bt.checks}
    for c in bt.checks:
        assert c.seeds == 2 and c.covered
        assert abs(c.error) < 0.02 and abs(c.predicted - truth[c.trial]) < 0.015  # seed noise 0.003
        assert c.interval[0] < c.predicted < c.interval[1]
    assert bt.mean_abs_error < 0.015


def test_backtest_detects_a_wrong_prediction():
    """A held-out trial that did far worse than its family's law is reported as missed."""
    rows = epochs_study(sd=0.003, seed=4)
    rows = [trial("w", 8, 2000, seeds=(0, 1), final=0.3) if r.name == "w-x8" else r for r in rows]
    bt = analysis.summarize(StudyConfig(strategies=("d", "w")), rows).backtest
    miss = next(c for c in bt.checks if c.trial == "w-x8")
    assert not miss.covered and miss.error == pytest.approx(miss.predicted - 0.3)
    assert miss.error > 0.15 and bt.max_abs_error == pytest.approx(abs(miss.error))
    assert bt.covered == 1


@pytest.mark.usefixtures("_point_estimates")
def test_the_held_out_trials_seeds_never_set_the_intervals_that_judge_them():
    """The backtest's noise is that of the trials it fits, and so is the summary's: seeds of a held-out
    trial that disagree (or agree) move its measured value, never the intervals nor the noise that
    decides valleys and ties."""
    rows = epochs_study(sd=0.003, seed=4)
    rows = [trial("d", 2, 2000, seeds=(0, 1), sd=0.003, rng=np.random.default_rng(5)) if r.name == "d-x2"
            else r for r in rows]  # a fitted trial with two seeds: the noise has a degree of freedom
    wild = [replace(r, seeds=(r.seeds[0], replace(r.seeds[1], points=tuple(
        replace(p, accuracy=p.accuracy + 0.06) for p in r.seeds[1].points)))) if r.name.endswith("x8") else r
        for r in rows]
    summaries = [analysis.summarize(StudyConfig(strategies=("d", "w")), x) for x in (rows, wild)]
    calm, loud = (x.backtest for x in summaries)
    assert summaries[1].noise == summaries[0].noise  # nor the noise every later choice reads
    assert [c.interval for c in loud.checks] == [c.interval for c in calm.checks]
    assert [c.noise for c in loud.checks] == [c.noise for c in calm.checks]
    assert [c.measured - 0.03 for c in loud.checks] == pytest.approx([c.measured for c in calm.checks])


def test_the_leaders_are_chosen_among_the_fitted_trials_and_the_held_out_run_every_seed():
    trials = [SimpleNamespace(name=n) for n in ("base", "d-x2", "d-x4", "w-x2", "w-x4")]
    score = {"base": 0.7, "d-x2": 0.8, "d-x4": 0.95, "w-x2": 0.75, "w-x4": 0.9}  # the held-out lead
    chosen = [t.name for t in extra_seeds(trials, score, {"d-x4", "w-x4"}, 2)]
    assert chosen == ["d-x2", "w-x2", "d-x4", "w-x4"]
    assert [t.name for t in extra_seeds(trials, score, {"d-x4", "w-x4"}, 0)] == ["d-x2", "w-x2", "base",
                                                                                 "d-x4", "w-x4"]


# ----------------------------------------------------------------------------- recommendation
@pytest.mark.slow  # a flat law converges slowly: about 9 s
def test_trials_within_noise_tie_and_the_cheapest_is_named():
    flat = fits.Law(
        ("d", "w"), 0.3, 1e-4, (0.5, 0.5), 1e-4, 0.5, 0.0, N0, 1e4, 0.0, 0
    )  # size and length barely matter
    rows = epochs_study(flat, sd=0.004, seed=2)
    rec = analysis.summarize(StudyConfig(strategies=("d", "w")), rows).recommendation
    assert len(rec.measured_tied) >= 5
    assert rec.measured.seconds == min(c.seconds for c in rec.measured_tied)
    assert rec.measured.name == "base" and rec.measured.steps == 500  # a quarter of the base: cheapest of all
    assert {c.strategy for c in rec.tied} == {"d", "w"}
    assert rec.pick.seconds <= rec.best.seconds


@pytest.mark.usefixtures("_point_estimates")
def test_the_recommendation_is_the_laws_compute_optimal_size():
    """Against the closed form: for error = e + a (N/n0)^-alpha + b (D/d0)^-beta (N/n0)^-gamma at
    D = C / (3 N), with k = beta - gamma, the optimal size is
    N* = n0 [(alpha a / (k b)) (C / (3 n0 d0))^beta]^(1/(alpha+k))."""
    rows = epochs_study()
    study = StudyConfig(strategies=("d", "w"), target="compute:1e14", ahead=(10.0,))
    s = analysis.summarize(study, rows)
    for c in (s.recommendation.best, s.recommendation.ahead[0]):
        law = s.law.law(c.strategy)
        compute = 1e14 * c.multiple
        alpha, beta, k = law.alpha(c.strategy), law.beta, law.beta - law.gamma
        x = (alpha * law.a / (k * law.b)) * (compute / (3 * law.n0 * law.d0)) ** beta
        n_star = law.n0 * x ** (1 / (alpha + k))
        assert c.flops == pytest.approx(n_star, rel=0.25)  # the nearest shape on a 2^(1/8) grid of factors
        best = 1 - float(law.predict(c.strategy, n_star, compute / (3 * n_star)))
        assert c.accuracy == pytest.approx(best, abs=2e-3)
        assert c.compute == pytest.approx(compute, rel=1e-6)
    assert s.recommendation.best.strategy == "w"  # the larger size exponent
    assert s.recommendation.ahead[0].extrapolation


@pytest.mark.usefixtures("_point_estimates")
def test_isoflops_compare_trials_at_equal_compute():
    rows = [trial("d", 1, 2000, fractions=(0.25, 0.5, 1.0))]
    rows += [trial(s, f, round(2000 / f), fractions=(0.25, 0.5, 1.0)) for s in ("d", "w") for f in (2, 4)]
    s = analysis.summarize(StudyConfig(strategies=("d", "w"), budget="compute:1e12"), rows)
    assert len(s.isoflops) >= 3
    full = next(i for i in s.isoflops if math.isclose(i.compute, rows[0].compute, rel_tol=1e-9))
    assert set(full.trials) == {r.name for r in rows}
    for measured, predicted in zip(full.measured, full.predicted, strict=True):
        assert measured == pytest.approx(predicted, abs=0.01)  # interpolated between annealed points
    assert full.best == max(zip(full.measured, full.trials, strict=True))[1]


def test_runtime_model_leave_one_out_exposes_an_odd_config():
    rng = np.random.default_rng(3)
    flops, acts = rng.uniform(1e9, 1e10, 8), rng.uniform(1e6, 1e7, 8)
    t = 2e-12 * flops + 3e-8 * acts + 1e-4
    m = fits.fit_runtime(flops, acts, t)
    assert (m.per_flop, m.per_act, m.overhead) == pytest.approx((2e-12, 3e-8, 1e-4), rel=1e-6)
    assert max(map(abs, fits.runtime_loo(flops, acts, t))) < 1e-9
    t[5] *= 2
    loo = fits.runtime_loo(flops, acts, t)
    assert loo[5] < -0.3  # predicted from the others, the slow config is about half as slow as it was


@pytest.mark.usefixtures("_point_estimates")
def test_summary_is_written_and_read_back_typed(tmp_path):
    rows = epochs_study(sd=0.003, seed=5)
    s = analysis.summarize(StudyConfig(strategies=("d", "w")), rows)
    path = tmp_path / "summary.json"
    summary.write(path, s)
    back = summary.read(path)
    assert back == s
    assert isinstance(back.backtest.checks[0], summary.Check) and isinstance(back.law.laws[0], fits.Law)
    path.write_text(path.read_text().replace(f'"version": {summary.VERSION}', '"version": 0', 1))
    with pytest.raises(StaleResult, match="version"):
        summary.read(path)


def test_noise_pools_seeds_and_never_falls_below_validation_sampling():
    rows = epochs_study()
    assert analysis.noise(rows).seed_sd == pytest.approx(0.004)  # identical seeds: the binomial floor
    two = [
        replace(
            r,
            seeds=(
                r.seeds[0],
                replace(
                    r.seeds[1],
                    points=tuple(replace(p, accuracy=p.accuracy + 0.02) for p in r.seeds[1].points),
                ),
            ),
        )
        if len(r.seeds) == 2
        else r
        for r in rows
    ]
    n = analysis.noise(two)
    assert n.dof == 2 and n.seed_sd == pytest.approx(math.sqrt(2 * 2 * 0.01**2 / 2))


@pytest.mark.usefixtures("_point_estimates")
def test_a_time_target_buys_each_shape_the_samples_its_measured_speed_allows():
    rows = epochs_study()
    s = analysis.summarize(StudyConfig(strategies=("d", "w"), target="time:30m", ahead=()), rows)
    rec = s.recommendation
    assert rec.seconds == 1800 and rec.compute is None
    for c in rec.tied + (rec.best,):
        assert c.seconds == pytest.approx(1800, rel=1e-3)  # the runtime model is exact on these trials
    assert all(c.seconds <= 1800 * (1 + 1e-6) for c in rec.measured_tied)


@pytest.mark.usefixtures("_point_estimates")
def test_the_summary_names_the_split_its_accuracies_are_measured_on():
    """Final accuracies are test accuracies where the data holds a test split (val selects)."""
    rows = epochs_study()
    assert analysis.summarize(StudyConfig(strategies=("d", "w")), rows).metric == "test top-1"
    no_test = StudyConfig(strategies=("d", "w"), overrides=(*StudyConfig().overrides, "data.test_size=0"))
    assert analysis.summarize(no_test, rows).metric == "val top-1"


# ----------------------------------------------------------------------------- recipes
def _under(r: TrialResult, recipe: str, train_ratio: float) -> TrialResult:
    """Trial r as its recipe twin: renamed (base+mr, w+mr-x2), in the recipe's families, training at
    `train_ratio` x its forward multiply-adds per sample (its points' compute with it)."""
    name = f"base+{recipe}" if r.name == "base" else r.name.replace("-x", f"+{recipe}-x")
    scale_ = train_ratio * r.flops / r.train_flops_per_sample
    seeds = tuple(
        replace(s, trial=name, points=tuple(replace(p, compute=p.compute * scale_) for p in s.points))
        for s in r.seeds
    )
    return replace(r, name=name, strategies=tuple(f"{s}+{recipe}" for s in r.strategies),
                   train_flops_per_sample=train_ratio * r.flops, seeds=seeds)


@pytest.mark.slow  # two families' structure, backtest and fit: about 20 s
def test_a_recipe_is_fitted_as_families_of_its_own_and_moves_the_frontier(monkeypatch):
    """A recipe whose trials follow a law 3 points better (at 10% more training compute per sample)
    gets its own law (its base its anchor), its own backtest check, and a frontier above the plain
    one where the trials were measured, each family's samples bought at its own training cost."""
    monkeypatch.setattr(lawfit, "BOOTSTRAP", 4)
    better = replace(TRUE, e=TRUE.e - 0.03)
    plain = [r for r in epochs_study() if "w" in r.strategies]
    twins = [_under(r, "mr", 3.3) for r in epochs_study(better) if "w" in r.strategies]
    study = StudyConfig(strategies=("w",), recipes=("mr:train.resolutions=12,16,20",))
    s = analysis.summarize(study, plain + twins)
    assert s.strategies == ("w", "w+mr")
    assert set(s.backtest.held_out) == {"w-x8", "w+mr-x8"}
    assert {c.trial for c in s.backtest.checks} == set(s.backtest.held_out)
    assert all(abs(c.error) < 0.02 for c in s.backtest.checks)
    assert s.law.law("w+mr") is not s.law.law("w")  # a law per recipe: the recipe may move all of it
    w4 = next(r for r in plain if r.name == "w-x4")
    gain = float(s.law.predict("w", w4.flops, w4.samples) - s.law.predict("w+mr", w4.flops, w4.samples))
    assert gain == pytest.approx(0.03, abs=0.01)
    top = max(p.compute for r in plain for p in r.points())
    c = min({p.compute for p in s.frontier if p.compute >= top})
    at = {p.strategy: p for p in s.frontier if p.compute == c}
    assert at["w+mr"].accuracy > at["w"].accuracy + 0.01
    for p in at.values():  # equal compute buys the recipe fewer samples: each at its own cost per sample
        assert p.samples * (3.3 if p.strategy == "w+mr" else 3.0) * p.flops == pytest.approx(c, rel=1e-6)
