"""The study without training (--plan, --collect), on submitit's and Ray's launchers, and its time
budgets tied to the hardware that measured them."""

import fcntl
import importlib.util
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vitscale.cli import main
from vitscale.common import records
from vitscale.common.errors import NotFinite, UserError
from vitscale.study import diagnose, launch, launch_args, preview, results
from vitscale.study import runner as study
from vitscale.study.results import Point, SeedResult, Sizing
from vitscale.study.slurm import SlurmLauncher
from vitscale.study.trials import hardware
from vitscale.train import engine, optim
from vitscale.train.metrics import read_metrics

TINY = ("data.name=cluttered-digits", "data.image_size=8", "data.scale_min=1", "data.train_size=512",
        "data.val_size=64", "data.test_size=64", "train.batch=32", "model.heads=4", "train.threads=1")


def tiny(tmp_path, **kw) -> study.StudyConfig:
    base = dict(strategies=("d", "w"), factors=(1, 2), budget="epochs:2", lrs=(), fractions=(0.5, 1),
                seeds=1, overrides=TINY, out=str(tmp_path / "s"))
    return study.StudyConfig(**(base | kw))


@pytest.fixture
def local_ray():
    """A local Ray cluster of 2 CPUs, one at a time on this machine (make test runs tests on several
    pytest-xdist workers)."""
    ray = pytest.importorskip("ray")
    with open(Path(tempfile.gettempdir()) / "vitscale-tests-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


# ----------------------------------------------------------------------------- --plan
def test_the_plan_counts_steps_and_compute_as_the_study_spends_them(tmp_path):
    cfg = tiny(tmp_path, strategies=("d",), lrs=(1e-3, 2e-3), seeds=2, leaders=1)
    p = preview.describe(cfg)
    assert not Path(cfg.out).exists()  # nothing written
    assert [r["name"] for r in p["trials"]] == ["base", "d-x2"]
    spe = 512 // 32
    for r in p["trials"]:
        assert r["steps_per_epoch"] == spe and r["steps"] == 2 * spe  # epochs:2
        assert r["compute"] == pytest.approx(2 * spe * 32 * r["train_flops_per_sample"])
        # seed 0: stable to the last branch point, then each branch from its start to its end
        lengths = [16, 32]
        starts = [optim.decay_start(n, 0.2) for n in lengths]
        steps0 = max(starts) + sum(n - s for n, s in zip(lengths, starts, strict=True))
        assert r["seed0_compute"] == pytest.approx(steps0 * 32 * r["train_flops_per_sample"])
    d2 = next(r for r in p["trials"] if r["name"] == "d-x2")
    assert (d2["depth"], d2["width"], d2["heads"], d2["patch"], d2["side"]) == (8, 32, 4, 4, 8)
    base = p["trials"][0]
    sweep = p["phases"]["sweep"]
    assert sweep["steps"] == [16]  # epochs:2: every trial as long, one length
    assert sweep["compute"] == pytest.approx(2 * 16 * 32 * base["train_flops_per_sample"])
    assert p["phases"]["seeds"]["held_out"] == ["d-x2"]  # each family's largest
    c = p["compute"]
    extra = sum(r["seed_compute"] for r in p["trials"][1:]) + base["seed_compute"]  # held out + 1 leader
    assert c["more_seeds"] == pytest.approx(extra)
    seed0 = sum(r["seed0_compute"] for r in p["trials"])
    assert c["total"] == pytest.approx(sweep["compute"] + seed0 + extra)
    assert p["time"] is None and "time: known once every trial is sized" in "\n".join(preview.lines(p))
    for name in ("base", "d-x2"):  # sized by a run at 1000 samples/s: time is training samples over it
        (Path(cfg.out) / "trials" / name).mkdir(parents=True)
        results.write(Path(cfg.out) / "trials" / name / "trial.json", _sizing(2 * spe))
    t = preview.describe(cfg)["time"]
    assert t["seed0"] == pytest.approx(2 * steps0 * 32 / 1000)
    assert t["sweep"] == pytest.approx(2 * 16 * 32 / 1000)
    assert t["more_seeds"] == pytest.approx(2 * 2 * spe * 32 / 1000)  # d-x2 held out, base the leader
    assert t["total"] == pytest.approx(t["sweep"] + t["seed0"] + t["more_seeds"])


def test_a_time_budget_plan_says_measured_when_run(tmp_path, capsys):
    args = ["study", "--plan", "--budget", "time:1m", "--strategy", "d", "--factors", "1,2", "--lrs", "",
            "--out", str(tmp_path / "s"), *(f"--{o}" for o in TINY)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "measured when run" in text and "d-x2: d x2" in text and "depth 8 width 32" in text
    assert main([*args, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["kind"] == "StudyPlan" and all(r["steps"] is None for r in p["trials"])
    assert p["compute"]["total"] is None and not (tmp_path / "s").exists()
    (tmp_path / "s" / "trials" / "base").mkdir(parents=True)
    results.write(tmp_path / "s" / "trials" / "base" / "trial.json", _sizing(40))  # sized by a run: its steps
    assert main([*args, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    steps = [(r["steps"], r["steps_from"]) for r in p["trials"]]
    assert steps == [(40, "trial.json"), (None, "measured when run")]
    assert main([*args, "--trial", "base"]) == 2
    assert "--plan and --collect work on the whole study" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --collect
def _sizing(steps: int, hardware: str = "cpu: test") -> Sizing:
    return Sizing(3e6, steps, 16, 64, {"samples_per_s": 1000.0, "ms_per_step": 32.0, "peak_mem_mb": 1.0}, 1,
                  hardware)


def _seed(name: str, acc: float, steps: int) -> SeedResult:
    pts = tuple(Point(f, round(f * steps), round(f * steps) * 32, 3e6 * 32 * round(f * steps), 1.0,
                      acc - 0.1 * (1 - f), 1.0, 0.05, True) for f in (0.5, 1.0))
    return SeedResult(name, 0, pts, (replace(pts[0], annealed=False),), 1.0, 1000.0)


def test_collect_reports_what_finished_and_names_what_did_not(tmp_path, monkeypatch, capsys, logged):
    cfg = tiny(tmp_path)
    out = Path(cfg.out)
    out.mkdir()
    (out / "study.yaml").write_text(study.dump_study(cfg))
    for name in ("base", "d-x2", "w-x2"):
        (out / "trials" / name / "seed0").mkdir(parents=True)
    for name, acc in (("base", 0.5), ("d-x2", 0.6)):
        results.write(out / "trials" / name / "trial.json", _sizing(32))
        results.write(out / "trials" / name / "seed0" / "result.json", _seed(name, acc, 32))
    results.write(out / "trials" / "w-x2" / "trial.json", _sizing(32))  # sized, not trained
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("--collect trained"))
    summary = preview.collect(cfg)
    assert [x for x in logged if x.startswith("missing")] == ["missing: w-x2 (seed 0 has not finished)"]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["base", "d-x2"]
    assert summary.recommendation.measured_best.name == "d-x2"
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    with pytest.raises(UserError, match="holds no study"):
        preview.collect(replace(cfg, out=str(tmp_path / "none")))
    assert main(["study", "--config", str(out / "study.yaml"), "--collect"]) == 0  # the CLI's report
    assert "missing: w-x2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- hardware
def test_time_budgets_refuse_sizings_from_other_hardware(tmp_path):
    cfg = tiny(tmp_path, budget="time:30s")
    here = hardware("cpu")
    assert here.startswith("cpu: ") and len(here) > 5
    sizes = {"base": _sizing(32, here), "d-x2": _sizing(16, "cuda: NVIDIA H100 80GB HBM3")}
    with pytest.raises(UserError, match="sized on different hardware") as e:
        study.one_hardware(cfg, sizes)
    assert "\n" not in str(e.value)
    study.one_hardware(replace(cfg, budget="epochs:2"), sizes)  # steps that do not depend on speed
    study.one_hardware(cfg, {"base": sizes["base"], "w-x2": _sizing(9, here)})
    trial = study.plan(cfg)[1]
    with pytest.raises(UserError, match="measured on cuda: NVIDIA H100 80GB HBM3, but this node has"):
        study.run_seed(cfg, trial, sizes["d-x2"], 0)


# ----------------------------------------------------------------------------- launchers
def _trial_results(out: Path) -> dict:
    return {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_launcher_arguments_are_checked(tmp_path):
    with pytest.raises(UserError, match="launcher must be one of local, slurm, ray"):
        tiny(tmp_path, launcher="k8s")
    with pytest.raises(UserError, match="not KEY=VALUE"):
        launch_args.options("slurm", ("timeout_min",))
    assert launch_args.options("slurm", ("timeout_min=240", "slurm_partition=gpu")) == {"timeout_min": 240,
                                                                                   "slurm_partition": "gpu"}
    with pytest.raises(UserError, match="launcher_args are for --launcher slurm or ray"):
        launch.launcher_for(tiny(tmp_path, launcher_args=("x=1",)), 1)
    if importlib.util.find_spec("submitit"):
        with pytest.raises(UserError, match="launcher arguments for slurm: unknown foo; known: cluster"):
            launch.launcher_for(tiny(tmp_path, launcher="slurm", launcher_args=("cluster=local", "foo=1")), 1)
    if importlib.util.find_spec("ray"):  # both refused before Ray starts
        for bad, match in (("foo=1", "unknown foo"), ("ranks=0", "ranks must be an integer of 1 or more")):
            with pytest.raises(UserError, match=match):
                launch.launcher_for(tiny(tmp_path, launcher="ray", launcher_args=(bad,)), 1)


@pytest.mark.slow
def test_a_study_on_submitits_local_executor_matches_the_local_one(tmp_path):
    """Sizing in one job, then every trial a task of one job array; the same results as in process."""
    pytest.importorskip("submitit")
    # one cooldown a seed (fractions 1): the launchers, not the branches, are the subject here
    cfg = tiny(tmp_path, strategies=("d",), holdout=0, budget="epochs:1", fractions=(1,), launcher="slurm",
               launcher_args=("cluster=local", "timeout_min=5"))
    study.run_study(cfg)
    out = Path(cfg.out)
    tasks = [p for p in (out / "slurm").glob("*/*_submitted.pkl")]
    assert len(tasks) == 3  # the sizing job, then the trials' array (one job per task on the local executor)
    assert {p.name for p in (out / "trials").iterdir()} == {"base", "d-x2"}
    sized = results.read(out / "trials" / "d-x2" / "trial.json", Sizing)
    assert sized.hardware == hardware("cpu")
    assert "test (64 items, final weights)" in (out / "trials" / "d-x2" / "seed0" / "log.txt").read_text()
    remote = _trial_results(out)

    local = replace(cfg, launcher="local", launcher_args=(), workers=1, out=str(tmp_path / "local"))
    for name in ("base", "d-x2"):  # the same sizing (measured throughput varies), trained in process
        dest = Path(local.out) / "trials" / name / "trial.json"
        dest.parent.mkdir(parents=True)
        dest.write_text((out / "trials" / name / "trial.json").read_text())
    (Path(local.out) / "study.yaml").write_text(study.dump_study(local))  # a study's folder, as --out wants
    study.run_study(local)
    here = _trial_results(Path(local.out))
    for name in ("base", "d-x2"):
        assert remote[name]["accuracies"] == here[name]["accuracies"]  # CPU runs are deterministic


def _in_background(launcher, cfg, tmp_path):
    """Run one training job through `launcher` on a thread: (the thread, results by name, errors)."""
    got, failed = {}, []
    job = ("run", engine.train, (replace(cfg, out=str(tmp_path / "run")),), tmp_path / "run.log")

    def wait():
        try:
            launcher.map([job], got.__setitem__)
        except Exception as e:  # noqa: BLE001
            failed.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    return waiter, got, failed


def _same_as_uninterrupted(cfg, result: engine.TrainResult, tmp_path) -> None:
    plain = engine.train(replace(cfg, out=str(tmp_path / "plain"))).metrics
    scores = [k for k in plain if "top1" in k or "loss" in k]
    assert scores and {k: result.metrics[k] for k in scores} == {k: plain[k] for k in scores}


def _training(run_dir: Path, deadline: float, after: int = -1, other: int = 0, resumes: int = 0) -> int:
    """The pid of the process training in `run_dir` (its .lock), not `other`, once a step past `after`
    is logged and the job's log (run.log beside it) says "resumed from" `resumes` times."""
    while time.time() < deadline:
        try:
            pid = json.loads((run_dir / ".lock").read_text())["pid"]
            steps = [r["step"] for r in read_metrics(run_dir) if r.get("split") == "train"]
            resumed = (run_dir.parent / "run.log").read_text().count("resumed from")
        except (OSError, ValueError, KeyError):
            pid, steps, resumed = None, [], 0
        if pid and pid != other and steps and max(steps) > after and resumed >= resumes:
            return pid
        time.sleep(0.05)
    pytest.fail(f"{run_dir} did not train past step {after} (resumed {resumes} times)")


@pytest.mark.slow
def test_a_preempted_or_killed_slurm_task_runs_again_and_ends_bit_for_bit(tmp_path):
    """Submitit's preemption signal (USR2) stops the run at a checkpoint and the task is requeued;
    a task killed outright is submitted again; both resume, and end where an uninterrupted run does."""
    pytest.importorskip("submitit")
    from vitscale.train import config

    cfg = records.apply_overrides(config.recipe("train"), ["model.depth=2", "model.width=32", "model.heads=2",
                                                           "model.patch_size=4", *TINY, "train.epochs=2"])
    slurm = SlurmLauncher(tmp_path / "slurm", {"cluster": "local", "timeout_min": 5}, 1, 0.1)
    waiter, got, failed = _in_background(slurm, cfg, tmp_path)
    pid = _training(tmp_path / "run", time.time() + 60)
    os.kill(pid, signal.SIGUSR2)  # preempted: checkpoint, requeue
    pid = _training(tmp_path / "run", time.time() + 60, other=pid, resumes=1)
    os.kill(pid, signal.SIGKILL)  # killed: the launcher submits it again
    waiter.join(timeout=120)
    assert not failed and "run" in got, failed
    log = (tmp_path / "run.log").read_text()
    assert log.count("resumed from") == 2, log
    assert "Caught signal SIGUSR2" in "".join(p.read_text() for p in (tmp_path / "slurm").glob("*/*_log.err"))
    assert len(list((tmp_path / "slurm").glob("*/*_submitted.pkl"))) == 2  # the second submission
    _same_as_uninterrupted(cfg, got["run"], tmp_path)


@pytest.mark.slow
def test_a_study_on_a_local_ray_cluster(tmp_path, local_ray):
    """ranks=2: each run's two ranks are processes of its Ray task (gloo here), as under torchrun
    --standalone; the sizing runs in the task alone. The base alone: a second trial's two ranks
    would show nothing the base's do not."""
    cfg = tiny(tmp_path, strategies=("d",), factors=(1,), holdout=0, budget="epochs:1", fractions=(1,),
               launcher="ray",
               launcher_args=("num_cpus=2", "ranks=2", "max_retries=2"))
    study.run_study(cfg)
    rows = _trial_results(Path(cfg.out))
    assert set(rows) == {"base"} and all(0 <= a <= 1 for a in rows["base"]["accuracies"])
    log = (Path(cfg.out) / "trials" / "base" / "seed0" / "log.txt").read_text()
    assert "on cpu x2" in log and "ranks 2" in log, log
    sized = results.read(Path(cfg.out) / "trials" / "base" / "trial.json", Sizing)
    assert sized.hardware == hardware("cpu")


@pytest.mark.slow
def test_a_ray_task_whose_worker_dies_is_retried_and_resumes(tmp_path, local_ray):
    """Ray runs a task again when its worker dies (max_retries); the run resumes from its checkpoint
    and ends where an uninterrupted run does. A job's UserError comes back as one, not retried."""
    from vitscale.train import config

    cfg = records.apply_overrides(config.recipe("train"), ["model.depth=2", "model.width=32", "model.heads=2",
                                                           "model.patch_size=4", *TINY, "train.epochs=3"])
    runner = launch.RayLauncher({"num_cpus": 1, "max_retries": 2}, 0)
    missing = tiny(tmp_path, out=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="holds no study"):
        runner.map([("bad", preview.collect, (missing,), tmp_path / "bad.log")], lambda *a: None)
    waiter, got, failed = _in_background(runner, cfg, tmp_path)
    pid = _training(tmp_path / "run", time.time() + 60, after=16)  # past epoch 1's checkpoint
    os.kill(pid, signal.SIGKILL)
    waiter.join(timeout=120)
    assert not failed and "run" in got, failed
    assert (tmp_path / "run.log").read_text().count("resumed from") == 1
    _same_as_uninterrupted(cfg, got["run"], tmp_path)


@pytest.mark.slow
def test_a_slurm_job_of_two_tasks_trains_a_trial_on_two_ranks(tmp_path):
    """tasks_per_node=2: each run's two ranks are the job's two tasks (gloo here), as under torchrun;
    the sizing job runs on its first task alone. The base alone: each job of two tasks starts two
    processes, and a second trial would show nothing the first does not."""
    pytest.importorskip("submitit")
    cfg = tiny(tmp_path, strategies=("d",), factors=(1,), holdout=0, budget="epochs:1", fractions=(1,),
               launcher="slurm",
               launcher_args=("cluster=local", "timeout_min=5", "tasks_per_node=2"))
    study.run_study(cfg)
    rows = _trial_results(Path(cfg.out))
    assert set(rows) == {"base"}
    log = (Path(cfg.out) / "trials" / "base" / "seed0" / "log.txt").read_text()
    assert "on cpu x2" in log and "ranks 2" in log, log


# ----------------------------------------------------------------------------- a diverging trial
@pytest.mark.slow  # a trial's seed trained twice and a second seed: about 11 s
def test_a_loss_that_is_not_finite_trains_the_seed_again_at_half_the_rate(tmp_path, monkeypatch):
    """The engine's NotFinite at the trial's rate: the seed trains again, whole, at half of it, in
    half-lr/; seed 1 starts there; the trial reports that rate and a flag that keeps it in
    the fits. Divergence at half the rate too stops the study, as before."""
    cfg = tiny(tmp_path, seeds=2)
    trial = study.plan(cfg)[0]
    real, rates = engine.train, []

    def diverges_at(limit):
        def train(run, d=None):
            rates.append(run.train.base_lr)
            if run.train.base_lr > limit:
                raise NotFinite(f"loss is nan at step 3; the last good checkpoint is {run.out}")
            return real(run, d)
        return train

    lr = trial.run.train.base_lr
    monkeypatch.setattr(engine, "train", diverges_at(0.75 * lr))
    sizing = study.size_trial(cfg, trial, 1.0, 1)
    first = study.run_seed(cfg, trial, sizing, 0)
    assert first.halved == 1 and rates[0] == lr and set(rates[1:]) == {lr / 2}
    seed0 = Path(cfg.out) / "trials" / "base" / "seed0"
    assert (seed0 / "half-lr" / "cool-1" / "final.json").is_file()
    trained = [r["lr"] for r in read_metrics(seed0 / "half-lr" / "stable") if "lr" in r]
    assert max(trained) == pytest.approx(lr / 2 * trial.run.train.batch / 256)  # at half the rate
    rates.clear()
    second = study.run_seed(cfg, trial, sizing, 1)
    assert second.halved == 1 and set(rates) == {lr / 2}  # seed 1 starts at seed 0's rate
    row = study._trial_result(trial, sizing, {0: first, 1: second})
    (flag,) = [f for f in diagnose.diagnose([row]) if f.kind == "unstable"]
    assert row.lr == lr / 2 and "diverged" in flag.detail and not flag.left_out
    assert results.read(seed0 / "result.json", SeedResult) == first  # the result names its halving
    monkeypatch.setattr(engine, "train", diverges_at(0.0))
    with pytest.raises(NotFinite):
        study.run_seed(replace(cfg, out=str(tmp_path / "t")), trial, sizing, 0)
