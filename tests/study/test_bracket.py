"""Bracketing against families with a known optimum: a family grows outward until its best has a
worse neighbour on each side, no further than its cap, and stops where the scaler gives no new shape
or (collecting) where a trial has not finished."""

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitscale.common import dist, records
from vitscale.models.vit import ViTConfig
from vitscale.study import bracket, preview, rates, results, runner, verify
from vitscale.study import sweep as sweeps
from vitscale.study.config import StudyConfig, dump_study
from vitscale.study.rates import pick_lr
from vitscale.study.results import Point, SeedResult, Sizing, SweepPoint, TrialResult
from vitscale.study.summary import Candidate
from vitscale.study.trials import plan
from vitscale.train import engine

SE = 0.004  # a point's binomial standard error
TRIAL_FIELDS = {*TrialResult.__dataclass_fields__, "kind", "version"}


def family(*pairs):
    return [(f, a, SE) for f, a in pairs]


def test_outward_extends_the_edge_the_best_sits_at_or_is_tied_with():
    assert bracket.outward({"d": family((0.5, 0.8), (1, 0.7), (2, 0.6))}) == {"d": 0.25}
    assert bracket.outward({"w": family((0.5, 0.6), (1, 0.7), (2, 0.8))}) == {"w": 4}
    assert bracket.outward({"d": family((0.5, 0.6), (1, 0.8), (2, 0.6))}) == {}  # bracketed
    # the smallest within 2 standard errors of the best: the valley may lie below it
    assert bracket.outward({"d": family((0.5, 0.795), (1, 0.8), (2, 0.6))}) == {"d": 0.25}
    assert bracket.outward({"d": family((0.5, 0.8), (1, 0.7))}) == {}  # two sizes: no valley to look for


def _accuracy(factor: float, peak: float) -> float:
    return 0.8 - 0.05 * (math.log2(factor) - math.log2(peak)) ** 2


def _study(peaks: dict[str, float], floor: dict[str, float] | None = None, finished=None):
    """A plan over the default factors (plus extra), trials named as the study names them; a family
    cannot go below `floor` (its scaler's smallest shape); `finished`: names with results (all)."""
    floor = floor or {}

    def plan_(extra):
        out = {1.0: SimpleNamespace(name="base", strategies=tuple(peaks), factor=1.0)}
        for s in peaks:
            for f in (0.5, 1.5, 2.25, *(x for x in extra.get(s, ()) if x >= floor.get(s, 0))):
                out.setdefault((s, f), SimpleNamespace(name=f"{s}-x{f:g}", strategies=(s,), factor=f))
        return list(out.values())

    asked = []

    def results(trials):
        asked.extend(t.name for t in trials)
        return {t.name: (_accuracy(t.factor, peaks[t.strategies[0]]), SE) for t in trials
                if finished is None or t.name in finished}

    return plan_, results, asked


def test_a_family_grows_until_its_optimum_is_bracketed_and_no_further():
    plan_, results, asked = _study({"d": 0.25, "w": 1.0})
    trials = bracket.grow(2, plan_({}), plan_, results)
    names = {t.name for t in trials}
    assert {"d-x0.25", "d-x0.125"} <= names  # 0.25 is best once 0.125 shows a worse side
    assert not any(n.startswith("w-x") and n not in ("w-x0.5", "w-x1.5", "w-x2.25") for n in names)
    assert asked.count("d-x0.25") == 1  # each new trial's seed 0 is asked for once
    capped = bracket.grow(1, plan_({}), plan_, _study({"d": 0.25, "w": 1.0})[1])
    assert {t.name for t in capped} >= {"d-x0.25"} and "d-x0.125" not in {t.name for t in capped}


def test_growth_stops_where_the_scaler_has_no_smaller_shape_or_a_trial_has_not_finished():
    plan_, results, _ = _study({"d": 0.0625, "w": 1.0}, floor={"d": 0.25})
    names = {t.name for t in bracket.grow(3, plan_({}), plan_, results)}
    assert "d-x0.25" in names and "d-x0.125" not in names
    planned = {"base", "d-x0.5", "d-x1.5", "d-x2.25", "w-x0.5", "w-x1.5", "w-x2.25"}
    plan_, results, _ = _study({"d": 0.0625, "w": 1.0}, finished=planned)
    names = {t.name for t in bracket.grow(3, plan_({}), plan_, results)}
    assert "d-x0.25" in names and "d-x0.125" not in names  # planned, unfinished: growth waits for it


def test_the_plan_takes_extra_factors_and_merges_one_that_lands_on_a_planned_shape():
    study = StudyConfig()
    grown = {t.name: t for t in plan(study, None, {"d": (0.25, 0.125), "w": (4.0,)})}
    assert {"d-x0.25", "w-x4"} <= set(grown) and "d-x0.125" not in grown
    assert grown["d-x0.25"].run.model.depth == 1  # pico/4's depth 4 at a quarter: one block
    assert all(len(set(t.strategies)) == len(t.strategies) for t in grown.values())
    assert set(grown) - {"d-x0.25", "w-x4"} == {t.name for t in plan(study)}


TINY = ("data.name=cluttered-digits", "data.image_size=8", "data.scale_min=1", "data.train_size=512",
        "data.val_size=64", "data.test_size=64", "train.batch=32", "model.heads=4", "train.threads=1")


def _finished(out: Path, name: str, val: float) -> None:
    """A trial's sizing and seed 0 as the study writes them, its stable run ending at `val`."""
    steps = 32
    pts = tuple(Point(f, round(f * steps), round(f * steps) * 32, 3e6 * 32 * round(f * steps), 1.0,
                      val - 0.1 * (1 - f), 1.0, 0.004, True) for f in (0.5, 1.0))
    trial = out / "trials" / name
    (trial / "seed0").mkdir(parents=True)
    measured = {"samples_per_s": 1000.0, "ms_per_step": 32.0, "peak_mem_mb": 1.0}
    results.write(trial / "trial.json", Sizing(3e6, steps, 16, 64, measured, 1, "cpu: test"))
    curve = (replace(pts[-1], accuracy=val, annealed=False),)
    results.write(trial / "seed0" / "result.json", SeedResult(name, 0, pts, curve, 1.0, 1000.0))


@pytest.mark.slow
def test_collect_replays_the_growth_from_what_finished(tmp_path, monkeypatch, logged):
    """The study grew d below its smallest factor (d-x0.5 led): --collect plans what the study did,
    reports d-x0.25 once it finished and names it missing before."""
    cfg = StudyConfig(strategies=("d",), factors=(0.5, 1, 2), budget="epochs:2", lrs=(), fractions=(0.5, 1),
                      seeds=1, bracket=1, overrides=TINY, out=str(tmp_path / "s"))
    out = Path(cfg.out)
    out.mkdir()
    (out / "study.yaml").write_text(dump_study(cfg))
    for name, val in (("d-x0.5", 0.8), ("base", 0.7), ("d-x2", 0.6)):
        _finished(out, name, val)
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("--collect trained"))
    assert [t.name for t in runner.planned(cfg, None)] == ["d-x0.5", "base", "d-x2", "d-x0.25"]
    preview.collect(cfg)
    assert "missing: d-x0.25 (seed 0 has not finished)" in logged
    _finished(out, "d-x0.25", 0.75)  # worse than d-x0.5: bracketed, and the cap is 1 anyway
    summary = preview.collect(cfg)
    assert summary.trials == 4
    assert [t.name for t in runner.planned(replace(cfg, bracket=0), None)] == ["d-x0.5", "base", "d-x2"]


@pytest.mark.slow
def test_a_running_study_trains_the_factor_it_adds_and_verifies_its_picks(tmp_path, monkeypatch):
    """The growth inside a study (its first answer forced, the trials too short to mean anything): the
    added trial is sized, trained at seed 0, in results.jsonl and the summary; asked once, as capped.
    Then verification (its picks forced: these trials fit no law): a pick at twice the budget trains
    two seeds of twice the steps; a pick a trial measured is verified by that trial, nothing trained."""
    asked = []

    def once(sizes):
        asked.append(sorted(sizes["d"]))
        return {"d": 0.25}

    def picks(study, summary):
        by = {r.name: r for r in summary_rows(study)}
        return [candidate(by["d-x2"], 1.0), candidate(by["d-x0.25"], 2.0)]

    monkeypatch.setattr(bracket, "outward", once)
    monkeypatch.setattr(verify, "targets", picks)
    cfg = StudyConfig(strategies=("d",), factors=(1, 2), budget="epochs:1", lrs=(), fractions=(1.0,),
                      seeds=1, holdout=0, bracket=1, workers=1, overrides=TINY, out=str(tmp_path / "s"))
    summary = runner.run_study(cfg)
    assert len(asked) == 1 and [f for f, _, _ in asked[0]] == [1, 2]
    assert (Path(cfg.out) / "trials" / "d-x0.25" / "trial.json").is_file()
    rows = [json.loads(x)["name"] for x in (Path(cfg.out) / "results.jsonl").read_text().splitlines()]
    assert sorted(rows) == ["base", "d-x0.25", "d-x2"] and summary.trials == 3
    measured, ahead = summary.verified
    assert not measured.trained and measured.trial == "d-x2"
    assert ahead.trained and ahead.trial == "verify-d-x0.25-at-2x" and len(ahead.measured) == 2
    at2 = Path(cfg.out) / "trials" / ahead.trial
    one = json.loads((Path(cfg.out) / "trials" / "d-x0.25" / "trial.json").read_text())["steps"]
    assert ahead.steps == 2 * one and sorted(p.name for p in at2.glob("seed*")) == ["seed0", "seed1"]
    assert ahead.covered == (ahead.interval[0] <= ahead.mean <= ahead.interval[1])
    report = (Path(cfg.out) / "report.md").read_text()
    assert "**Verified ahead:** the law's pick at 2x the budget" in report
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("--collect trained"))
    assert preview.collect(cfg).verified == summary.verified  # read back, nothing trained


def summary_rows(study):
    return [results.from_dict(TrialResult, {k: v for k, v in json.loads(x).items() if k in TRIAL_FIELDS})
            for x in (Path(study.out) / "results.jsonl").read_text().splitlines()]


def candidate(r, multiple: float) -> Candidate:
    """Trial r's shape as the law's pick at `multiple` of the budget, predicted 50% (40-60)."""
    model = records.from_dict(ViTConfig, r.model)
    return Candidate("d", r.name, r.achieved, model, r.params, r.flops, r.steps, r.samples, r.compute, 1.0,
                     0.5, (0.4, 0.6), False, multiple)


def _sizing(steps: int) -> Sizing:
    return Sizing(3e6, steps, 16, 64, {"samples_per_s": 1000.0}, 1, "cpu: test")


class _Here:  # runs each job in this process, as the local launcher does with one worker
    def map(self, jobs, done):
        for name, fn, args, _ in jobs:
            done(name, fn(*args))


def test_a_best_rate_at_the_edge_of_the_sweep_extends_the_grid(tmp_path, monkeypatch):
    """Accuracy peaking at 3.2e-2, above the grid (2e-3 .. 1.6e-2): the sweep adds 3.2e-2,
    then 6.4e-2, which shows it the far side, and stops; the saved sweep reads back whole."""
    ran = []

    def fake_run(study, base, sizing, lr, steps, one=True, d=None):
        ran.append(lr)
        return SweepPoint(lr, steps, 1.0, 0.8 - 0.02 * math.log2(lr / 3.2e-2) ** 2, 1.0, SE, 1.0)

    monkeypatch.setattr(sweeps, "run_sweep_lr", fake_run)
    cfg = StudyConfig(out=str(tmp_path / "s"), bracket=2, lrs=(2e-3, 4e-3, 8e-3, 1.6e-2))
    (tmp_path / "s" / "sweep").mkdir(parents=True)
    points = sweeps.sweep(cfg, None, None, _Here(), dist.Dist(), run=True, steps=(10,))
    assert ran == [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]
    assert [p.lr for p in points] == ran and pick_lr(points).lr == 3.2e-2
    assert sweeps.read_sweep(cfg) == points
    (tmp_path / "t" / "sweep").mkdir(parents=True)
    capped = sweeps.sweep(replace(cfg, out=str(tmp_path / "t"), bracket=0), None, None, _Here(), dist.Dist(),
                          run=True, steps=(10,))
    assert [p.lr for p in capped] == [2e-3, 4e-3, 8e-3, 1.6e-2]


def test_the_rate_falls_with_length_and_each_trial_gets_its_own(tmp_path, monkeypatch):
    """A world whose best rate is 8e-3 at 100 steps and 4e-3 at 400 (rate ~ steps^-0.5): the sweep
    runs every rate at both lengths, finds each length's best between its grid points (the parabola's
    vertex), and a trial of 200 steps trains at their geometric mean; beyond the lengths the line is
    held within the rates swept. The longer length's best at the grid's edge extends the grid."""
    def best(steps):
        return 8e-3 * (steps / 100) ** -0.5

    def fake_run(study, base, sizing, lr, steps, one=True, d=None):
        return SweepPoint(lr, steps, 1.0, 0.8 - 0.02 * math.log2(lr / best(steps)) ** 2, 1.0, SE, 1.0)

    monkeypatch.setattr(sweeps, "run_sweep_lr", fake_run)
    cfg = StudyConfig(out=str(tmp_path / "s"), bracket=1, lrs=(4e-3, 8e-3, 1.6e-2))
    (tmp_path / "s" / "sweep").mkdir(parents=True)
    points = sweeps.sweep(cfg, None, None, _Here(), dist.Dist(), run=True, steps=(100, 400))
    assert sorted({(p.lr, p.steps) for p in points}) == sorted(
        (lr, n) for lr in (2e-3, 4e-3, 8e-3, 1.6e-2) for n in (100, 400))  # 4e-3 at an edge at 400 steps
    found = rates.rates(points)
    assert found.steps == (100, 400) and found.best == pytest.approx((8e-3, 4e-3), rel=1e-6)
    assert found.at(200) == pytest.approx(8e-3 / 2**0.5, rel=1e-6) and found.exponent == pytest.approx(-0.5)
    assert found.at(10_000) == 2e-3 and found.at(1) == 1.6e-2  # held within the rates swept
    trial = replace(plan(replace(cfg, lrs=()))[0], rates=found)
    assert trial.lr(400) == pytest.approx(4e-3) and plan(cfg, found)[0].lr(100) == pytest.approx(8e-3)
    assert sweeps.lengths(cfg, [_sizing(470), _sizing(2011), _sizing(1024)]) == (235, 1006)
    assert sweeps.lengths(cfg, [_sizing(470)] * 3) == (235,)  # trials all as long: one length
