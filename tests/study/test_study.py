"""The scaling study: its fits against independent solvers, its plan, and a miniature study
run end to end, killed midway and resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import pytest
import yaml

from vitscale.cli import main
from vitscale.common import errors
from vitscale.common.errors import UserError
from vitscale.cost.complexity import cost
from vitscale.study import rates, results, summary, trials
from vitscale.study.config import StudyConfig, parse_budget
from vitscale.study.rates import Rates
from vitscale.study.results import SeedResult, SweepPoint, TrialResult
from vitscale.study.trials import _base, branches, plan, steps_for
from vitscale.train import optim
from vitscale.train.flops import sample_shapes, train_flops_per_sample
from vitscale.train.steps import Plan

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("text,kind,amount,in_epochs", [
    ("epochs:20", "epochs", 20, False), ("compute:20ep", "compute", 20, True),
    ("compute:3e12", "compute", 3e12, False), ("time:90s", "time", 90, False),
    ("time:2m", "time", 120, False)])
def test_budgets_parse(text, kind, amount, in_epochs):
    b = parse_budget(text)
    assert (b.kind, b.amount, b.in_epochs) == (kind, amount, in_epochs)


@pytest.mark.parametrize("text", ["20", "epochs:20ep", "compute:-1", "time:", "flops:3"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_budgets_size_trials():
    """A trial with 4x the base's training cost per sample gets a quarter of its steps at equal compute."""
    base_epoch = 1000.0 * 20 * 64  # multiply-adds per sample x steps per epoch x batch
    kw = dict(batch=64, steps_per_epoch=20, samples_per_s=640.0, reference=base_epoch)
    assert steps_for(parse_budget("epochs:3"), 4000.0, **kw) == 60
    assert steps_for(parse_budget("compute:8ep"), 1000.0, **kw) == 160
    assert steps_for(parse_budget("compute:8ep"), 4000.0, **kw) == 40
    assert steps_for(parse_budget(f"compute:{8 * base_epoch}"), 4000.0, **kw) == 40
    assert steps_for(parse_budget("time:1m"), 4000.0, **kw) == 600  # 60 s x 640 samples/s / 64


def test_plan_shares_the_base_and_scales_the_data_resolution():
    trials = plan(StudyConfig(strategies=("d", "r"), factors=(1, 2, 4), lrs=()))  # r: no sweep
    names = [t.name for t in trials]
    assert names == ["base", "d-x2", "d-x4", "r-x2", "r-x4"]
    assert trials[0].strategies == ("d", "r")
    for t in trials:
        assert t.run.data.image_size == t.run.model.hw[0]
        assert t.achieved == pytest.approx(t.factor, rel=0.2)  # 16 px base: a coarse grid
        m = t.run.model  # muP relative to the base, whatever the trial's shape
        assert (m.param, m.base_width, m.base_depth, m.base_head_dim) == ("mup", 32, 4, 8)  # 4 heads
    assert trials[3].run.model.hw[0] > trials[0].run.model.hw[0]
    assert plan(StudyConfig(strategies=("d",), factors=(1,), param="sp"))[0].run.model.param == "sp"
    smaller = plan(StudyConfig(strategies=("d",), factors=(0.5, 1, 2)))
    assert smaller[0].name == "d-x0.5" and _base(smaller).name == "base"  # the sweep's model, not the first
    one = Rates((100,), (3e-3,), 1e-3, 1e-2)  # one length swept: every trial at its best
    trials = plan(StudyConfig(strategies=("w",), factors=(1, 2)), lr=one)
    assert {t.lr(n) for t in trials for n in (10, 10**4)} == {3e-3}


def test_branches_end_at_each_fraction_and_start_where_their_decay_does():
    plan_ = branches(800, (0.125, 0.25, 0.5, 1.0), 0.2)
    assert plan_ == [(0.125, 100, 80), (0.25, 200, 160), (0.5, 400, 320), (1.0, 800, 640)]
    for _, length, start in plan_:
        assert start == optim.decay_start(length, 0.2)
    assert branches(10, (0.125, 0.5, 1.0), 0.2) == [(0.5, 5, 4), (1.0, 10, 8)]  # too short: left out


def test_training_flops_are_two_to_three_forward_passes():
    """Backward costs about twice the forward, less the input gradient of the patch embedding."""
    trial = plan(StudyConfig(strategies=("w",), factors=(1,)))[0]
    forward = cost(trial.run.model.replace(num_classes=10))
    per_sample = train_flops_per_sample(trial.run, 10)
    assert 2.5 < per_sample / (forward.flops - forward.bias_flops) < 3.0


# ----------------------------------------------------------------------------- recipes
MR = "mr:train.resolutions=12,16,20"
TD = "td:model.keep=0.5 model.drop_after=2 model.drop_by=random"


def test_a_recipe_runs_every_strategys_trials_again_under_its_overrides():
    study = StudyConfig(strategies=("w",), factors=(1, 1.5), recipes=(MR, TD))
    trials = plan(study)
    assert study.families == ("w", "w+mr", "w+td")
    assert [t.name for t in trials] == ["base", "w-x1.5", "base+mr", "w+mr-x1.5", "base+td", "w+td-x1.5"]
    assert [t.strategies for t in trials] == [("w",)] * 2 + [("w+mr",)] * 2 + [("w+td",)] * 2
    plain = {t.name: t for t in trials}
    for name in ("base", "w-x1.5"):
        mr = plain[name.replace("-x", "+mr-x") if "-x" in name else "base+mr"]
        assert mr.run.model == plain[name].run.model and mr.run.train.resolutions == (12, 16, 20)
        assert replace(mr.run, train=replace(mr.run.train, resolutions=())) == plain[name].run
    td = plain["w+td-x1.5"].run.model
    assert (td.keep, td.drop_after) == (0.5, 2) and td.width > plain["base+td"].run.model.width
    assert [t.name for t in plan(StudyConfig())] == [  # none by default: the default study's 5 trials
        "d-x0.5", "base", "d-x2", "w-x0.5", "w-x2"]


def test_multi_resolution_training_flops_are_the_mean_over_its_sides():
    """Against a plain run at each side (its own module, its position table native), averaged."""
    run = plan(StudyConfig(strategies=("w",), factors=(1,), recipes=(MR,)))[1].run
    at = [replace(run, model=run.model.replace(image_size=s), data=replace(run.data, image_size=s),
                  train=replace(run.train, resolutions=())) for s in (12, 16, 20)]
    reference = sum(train_flops_per_sample(r, 10) for r in at) / 3
    assert train_flops_per_sample(run, 10) == pytest.approx(reference, rel=1e-9)
    assert train_flops_per_sample(at[1], 10) < 0.97 * reference  # not the data's side alone
    steps = Plan(replace(run.train, epochs=1), 1, 16, 1, 4, per_rank=32 * 9, per_step=32)  # 3 cycles of sides
    assert sample_shapes(run) == pytest.approx(steps.shares())  # the shares the engine's steps train at


def test_token_dropping_is_counted_as_the_module_trains():
    """The training module drops tokens, and FlopCounterMode sees it: against the closed form
    of the blocks after the drop (3x their forward matmuls: linears and attention's two)."""
    plain, td = plan(StudyConfig(strategies=("w",), factors=(1,), recipes=(TD,)))
    m = td.run.model
    n, k = m.num_patches + 1, m.kept(m.num_patches) + 1  # tokens with the cls token
    width, hidden = m.width, m.mlp_hidden
    per_token = 4 * width * width + 2 * width * hidden  # qkv, proj, mlp in and out
    saved = 3 * (m.depth - m.drop_after) * ((n - k) * per_token + 2 * (n * n - k * k) * width)
    dropped, full = train_flops_per_sample(td.run, 10), train_flops_per_sample(plain.run, 10)
    assert k < n and full - dropped == pytest.approx(saved, rel=1e-9)


def test_a_multi_resolution_trial_is_timed_at_each_side_as_it_trains(monkeypatch):
    """Throughput under train.resolutions: a third of the samples at each side, so seconds per
    sample are the mean of each side's (measurements stubbed: 1000 samples/s at side 12, and so on)."""
    from vitscale.cost import measure

    rate = {12: 1000.0, 16: 500.0, 20: 250.0}
    seen = []

    def measure_model(model, x, mode, dtype, warmup, iters, loss_fn):
        seen.append(x.shape[-1])
        return measure.Measurement("train", x.shape[0], dtype, "cpu", rate[x.shape[-1]],
                                 1e3 * x.shape[0] / rate[x.shape[-1]], float(x.shape[-1]))

    monkeypatch.setattr(measure, "measure_model", measure_model)
    run = plan(StudyConfig(strategies=("w",), factors=(1,), recipes=(MR,)))[1].run
    m = trials.measure_trial(run, 10, rounds=2)
    assert sorted(set(seen)) == [12, 16, 20] and len(seen) == 6
    assert m.samples_per_s == pytest.approx(1 / ((1 / 1000 + 1 / 500 + 1 / 250) / 3))
    assert m.ms_per_step == pytest.approx(sum(1e3 * run.train.batch / r for r in rate.values()) / 3)
    assert m.peak_mem_mb == 20.0


@pytest.mark.parametrize("recipes,message", [
    (("mr",), "not understood"),
    (("mr:train.resolutionz=12",), "recipe 'mr': unknown config key"),
    (("mr:train.resolutions=13",), "recipe 'mr': train.resolutions [13] are not multiples"),
    ((MR, "mr:train.ema=0.99"), "given twice"),
    (("big:model.width=96",), "model shape the strategies scale"),
    (("lr:train.base_lr=1e-3",), "which the study sets"),
    (("mg:train.multigrid=long",), "recipe 'mg' sets train.multigrid, which the study cannot size yet"),
    (("s2:train.probe_scales=1,2",), "acts on the MAE objective's linear probe only"),
])
def test_bad_recipes_are_one_line_user_errors(recipes, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        StudyConfig(recipes=recipes)
    assert "\n" not in str(e.value)


def test_a_recipe_the_scaled_shapes_cannot_take_is_refused():
    with pytest.raises(UserError, match="recipe 'mr' sets train.resolutions, but a strategy scales"):
        StudyConfig(strategies=("r",), recipes=(MR,), lrs=())
    with pytest.raises(UserError, match="strategy d1_t1 changes the token count, across which"):
        StudyConfig(strategies=("d", "d1_t1"))  # the sweep's rates would not suit it
    with pytest.raises(UserError, match="recipe 'td' with strategy d: drop_after must be"):
        plan(StudyConfig(strategies=("d",), factors=(0.5, 1), recipes=(TD,)))


# ----------------------------------------------------------------------------- end to end
MINI = ["study", "--strategy", "d,w", "--factors", "1,2", "--budget", "compute:1ep", "--data.image_size=8",
        "--data.train_size=1024", "--data.val_size=256", "--data.test_size=256", "--lrs", "2e-3,8e-3",
        "--fractions", "0.5,1", "--seeds", "2", "--train.threads=1", "--train.batch=32"]
# test_size: every run of every seed scores the test split at its end, and the data's default of
# 10,000 items cost the miniature study more than its training did


def vitscale(*args):
    return subprocess.Popen([sys.executable, "-m", "vitscale", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_miniature_study_killed_and_resumed(tmp_path, capsys):
    out = tmp_path / "study"
    first = vitscale(*MINI, "--out", str(out), "--workers", "1")
    done = out / "trials" / "base" / "seed0" / "result.json"
    deadline = time.time() + 240
    while not done.exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    base = done.read_text()
    assert not (out / "summary.json").exists()
    sweep = [results.from_dict(SweepPoint, p) for p in json.loads((out / "sweep" / "sweep.json").read_text())]
    assert sorted({p.lr for p in sweep}) == [2e-3, 8e-3] and all(0 <= p.accuracy <= 1 for p in sweep)
    assert len(sweep) == 4 and len({p.steps for p in sweep}) == 2  # every rate at two lengths

    second = vitscale(*MINI, "--out", str(out), "--workers", "2")
    log = second.communicate(timeout=400)[0]
    assert second.returncode == 0, log
    assert "1 trial seeds finished before, not re-run" in log
    assert done.read_text() == base
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["base", "d-x2", "w-x2"]
    found = rates.rates(sweep)
    trials = [results.from_dict(TrialResult, r) for r in rows]  # a line: the record plus derived figures
    for r, t in zip(rows, trials, strict=True):
        assert t.lr == pytest.approx(found.at(t.steps)) and t.model["param"] == "mup"  # its length's rate
        assert t.model["base_width"] == 32
        # the held-out trials (each strategy's largest) and the leaders, ranked among the fitted
        # trials (here the base alone), run two seeds
        assert [s.seed for s in t.seeds] == [0, 1]
        assert t.accuracies == r["accuracies"] and r["stderr"] > 0
        first, *others = t.seeds
        assert [p.fraction for p in first.points] == [0.5, 1.0] and all(p.annealed for p in first.points)
        assert [p.steps for p in first.points] == [round(0.5 * t.steps), t.steps]
        assert first.curve and all(not p.annealed for p in first.curve)
        assert all([p.fraction for p in s.points] == [1.0] for s in others)  # the full-length cooldown only
        assert r["compute"] == pytest.approx(t.steps * t.batch * t.train_flops_per_sample)
        cool = out / "trials" / r["name"] / "seed0" / "cool-1"
        assert yaml.safe_load((cool / "config.yaml").read_text())["train"]["branch_from"].endswith(
            f"ckpt-{optim.decay_start(t.steps, 0.2):08d}")
    s = summary.read(out / "summary.json")  # typed, versioned
    assert s.recommendation.measured_best.name in {"base", "d-x2", "w-x2"}
    assert s.sweep.lr == pytest.approx(found.at(trials[0].steps)) and 0 < s.sweep.share < 1
    assert s.strategies == ("d", "w") and s.backtest.held_out == ("d-x2", "w-x2")
    assert "no trial but the base" in s.backtest.note  # two sizes a strategy: nothing left to backtest
    assert {g.strategy: g.acts_exponent for g in s.growth}["d"] == pytest.approx(1.0, abs=0.05)
    for name in ("report.md", "frontier.png", "runtime.png", "growth.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "{" not in text and "}" not in text and "RMSE (points)" in text  # every sentence formatted
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "http" not in page
    assert page.index("Backtest") < page.index("Recommendation") < page.index("Learning-rate sweep")

    # the two runs after the killed one and its resume, in this process: no torch to import again
    capsys.readouterr()
    assert main([*MINI, "--out", str(out), "--json"]) == 0
    said, err = capsys.readouterr()
    assert "finished before" in err and json.loads(said)["kind"] == "Summary"  # stdout carries the JSON alone

    stale = out / "trials" / "w-x2" / "seed0" / "result.json"
    points = results.read(stale, SeedResult).points
    stale.write_text(json.dumps(json.loads(stale.read_text()) | {"version": 1}))  # another version's file
    with warnings.catch_warnings(record=True) as caught:  # no numpy complaints on the way
        warnings.simplefilter("always")
        # that seed alone runs again: its finished runs are re-read
        assert main([*MINI, "--out", str(out), "--workers", "1"]) == 0
    log = "".join(capsys.readouterr())
    assert "[1/1] w-x2 seed 0" in log and "running that seed again" in log and "[2/" not in log, log
    # those a process would print (Python hides these four by default)
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    assert "Warning" not in log and not [w for w in caught if not issubclass(w.category, hidden)], caught
    assert results.read(stale, SeedResult).points == points


@pytest.mark.parametrize("args,message", [
    (["--strategy", "q"], "strategy"),
    (["--budget", "compute:1e3"], "too small"),
    (["--out", "/proc/vitscale-study"], "cannot write"),
    (["--train.epochz=3"], "unknown config key"),
    (["--fractions", "0,1"], "fractions must be in (0, 1]"),
    (["--lrs=1e-3,-2e-3"], "lrs must be positive"),
    (["--seeds", "0"], "seeds must be at least 1"),
    (["--target", "epochs:3"], "give a compute (compute:3e12) or time"),
    (["--holdout", "-1"], "holdout must be 0"),
    (["--recipe", "big:model.width=96"], "recipe 'big' sets model.width, the model shape"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    """In process (`python -m vitscale` is main() and sys.exit; the miniature study runs it as a
    process): a child would spend most of its time importing torch before the refusal."""
    try:
        code = main([*MINI, "--out", str(tmp_path / "s"), *args])
    finally:
        errors.crash_dir(None)  # a study that opened its folder must not catch the next test's crash
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_mae_objective_probes_the_final_encoder_not_best(tmp_path, monkeypatch):
    """The budget counts every step of pre-training, so the probe reads the last checkpoint."""
    from vitscale.study.runner import _probe
    from vitscale.train import engine

    study = StudyConfig(objective="mae", strategies=("d",), factors=(1,))
    trial = plan(study)[0]
    run_dir = tmp_path / "cool-1"
    pretrained = replace(trial.run, out=str(run_dir))
    seen = {}

    def fake_train(cfg, d):
        seen["init"], seen["scales"] = cfg.init, cfg.train.probe_scales
        return engine.TrainResult({"val_top1": 0.5}, 40, None)

    monkeypatch.setattr(engine, "train", fake_train)
    monkeypatch.setattr("vitscale.common.checkpoint.last_good", lambda d: d / "ckpt-00000040")
    assert _probe(study, trial, pretrained, 0, None) == 0.5
    assert seen["init"] == str(run_dir / "ckpt-00000040") and seen["scales"] == (1,)
    s2 = replace(study, recipes=("s2:train.probe_scales=1,2",))  # S² as a recipe: its trials' probes
    assert _probe(s2, plan(s2)[1], pretrained, 0, None) == 0.5 and seen["scales"] == (1, 2)


def test_the_leading_trials_are_chosen_on_validation_never_on_test():
    """Extra seeds go to the trials best on val (the stable run's last evaluation); test only reports."""
    from vitscale.study.results import Point
    from vitscale.study.runner import _chosen_by

    def seed(val: float, test: float) -> SeedResult:
        mid = Point(0.9, 90, 90, 1.0, 1.0, val, 1.0, 0.01, False)
        end = Point(1.0, 100, 100, 1.0, 1.0, test, 1.0, 0.01, True)
        return SeedResult("t", 0, (end,), (mid,), 1.0, 1.0)

    a, b = seed(val=0.8, test=0.6), seed(val=0.7, test=0.9)
    assert _chosen_by(a) > _chosen_by(b)  # b is better on test, a on val: a leads
    assert _chosen_by(replace(b, curve=())) == 0.9  # no mid-run evaluation: its final point
