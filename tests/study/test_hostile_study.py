"""Hostile input to `vitscale study`: --collect on a study with only its base finished, launcher
arguments of the wrong type or range, budgets beyond any machine, Slurm on a machine without it,
and the study's other flags. Each ends in one line and exit 2 with nothing written, or does what
it can and exits 0; a bug's traceback lands in the study folder; no pickle is read from it."""

import json
import math
import sys
from pathlib import Path

import pytest
from test_study_launch import TINY, _seed, _sizing, tiny

from vitscale.cli import main
from vitscale.common import errors
from vitscale.common.errors import UserError
from vitscale.study import analysis, config, jobs, launch_args, preview, results, runner
from vitscale.study.results import SeedResult, Sizing, SweepPoint
from vitscale.study.slurm import SlurmLauncher
from vitscale.study.trials import plan, reference_compute, size_all

TINY_FLAGS = ["--strategy", "d,w", "--factors", "1,2", "--budget", "epochs:1", "--lrs", "",
              "--fractions", "0.5,1", "--seeds", "1", *(f"--{o}" for o in TINY)]


@pytest.fixture(autouse=True)
def _no_crash_dir():
    """crash_dir is the process's: a study this test opened must not catch the next test's crash."""
    yield
    errors.crash_dir(None)


def _one_line_exit_2(argv: list[str], capsys) -> str:
    """Run the CLI: exit 2 and one line on stderr, which is returned."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals (a type it cannot parse)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _study(tmp_path, finished: tuple[str, ...], **kw) -> config.StudyConfig:
    """A study directory whose `finished` trials have their sizing and seed 0 written, as the study
    writes them (nothing trained)."""
    cfg = tiny(tmp_path, **kw)
    out = Path(cfg.out)
    out.mkdir()
    (out / "study.yaml").write_text(config.dump_study(cfg))
    for i, name in enumerate(finished):
        (out / "trials" / name / "seed0").mkdir(parents=True)
        results.write(out / "trials" / name / "trial.json", _sizing(32))
        results.write(out / "trials" / name / "seed0" / "result.json", _seed(name, 0.5 + 0.1 * i, 32))
    return cfg


# ----------------------------------------------------------------------------- 7: --collect, crash files
def test_collect_with_only_the_base_finished_reports_it_and_skips_the_fits(tmp_path, capsys):
    cfg = _study(tmp_path, ("base",))
    out = Path(cfg.out)
    assert main(["study", "--config", str(out / "study.yaml"), "--collect"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    assert "collect: 1 of 3 trials finished" in printed
    assert [x for x in printed if x.startswith("missing")] == [
        "missing: d-x2 (seed 0 has not finished)", "missing: w-x2 (seed 0 has not finished)"]
    skipped = [x for x in printed if x.startswith("skipped")]
    assert any("the scaling law" in x and "another size than the base" in x for x in skipped), printed
    assert any("recommendation" in x for x in skipped) and any("the backtest" in x for x in skipped)
    assert any(x.startswith("best measured within the budget: base") for x in printed), printed
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()
    assert not (out / "crash.txt").exists()
    assert main(["study", "--config", str(out / "study.yaml"), "--collect", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["law"] is None and summary["recommendation"]["measured_best"]["name"] == "base"


def test_a_study_of_its_base_alone_is_summarized_without_a_law(tmp_path):
    """factors=(1,): every strategy's only trial is the base; nothing to fit, the base measured."""
    cfg = tiny(tmp_path, factors=(1,))
    (base,) = plan(cfg)
    row = runner._trial_result(base, _sizing(32), {0: _seed("base", 0.5, 32)})
    summary = analysis.summarize(cfg, [row])
    assert summary.law is None and summary.recommendation.pick is None
    assert summary.recommendation.measured_best.name == "base"
    assert any("scaling law" in x for x in preview.skipped(summary))


def test_a_crash_in_collect_leaves_its_traceback_in_the_study_folder(tmp_path, monkeypatch, capsys):
    cfg = _study(tmp_path, ("base", "d-x2"))
    out = Path(cfg.out)

    def bug(*a, **k):
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(analysis, "summarize", bug)
    assert main(["study", "--config", str(out / "study.yaml"), "--collect"]) == 1
    err = capsys.readouterr().err
    assert f"traceback in {out / 'crash.txt'}" in err, err
    assert "a planted bug" in (out / "crash.txt").read_text()


# ----------------------------------------------------------------------------- 8: launcher arguments
BAD_LAUNCHER_ARGS = [
    ("slurm", "timeout_min=abc", "timeout_min must be an integer of 1 or more, got 'abc'"),
    ("slurm", "timeout_min=[1", "timeout_min must be an integer of 1 or more, got '[1'"),
    ("slurm", "timeout_min=0", "timeout_min must be an integer of 1 or more, got '0'"),
    ("slurm", "timeout_min=2.5", "timeout_min must be an integer"),
    ("slurm", "mem_gb=nan", "mem_gb must be a number above 0"),
    ("slurm", "mem_gb=-4", "mem_gb must be a number above 0"),
    ("slurm", "gpus_per_node=-1", "gpus_per_node must be an integer of 0 or more"),
    ("slurm", "stderr_to_stdout=maybe", "stderr_to_stdout must be true or false"),
    ("slurm", "retries=-1", "retries must be an integer of 0 or more"),
    ("slurm", "cluster=k8s", "cluster must be one of slurm, local, debug"),
    ("slurm", "slurm_partition=", "slurm_partition must be a string that is not empty"),
    ("slurm", "slurm_setup=[1", "slurm_setup must be a list of strings"),
    ("slurm", "foo=1", "launcher arguments for slurm: unknown foo; known: "),
    ("ray", "num_cpus=-3", "num_cpus must be an integer of 1 or more, got '-3'"),
    ("ray", "num_gpus=abc", "num_gpus must be a number of 0 or more"),
    ("ray", "num_gpus=inf", "num_gpus must be a number of 0 or more"),
    ("ray", "max_retries=x", "max_retries must be an integer of -1 or more"),
    ("ray", "ranks=0", "ranks must be an integer of 1 or more"),
    ("ray", "timeout_min=5", "launcher arguments for ray: unknown timeout_min; known: "),
    ("ray", "=5", "is not KEY=VALUE"),
]


@pytest.mark.parametrize("launcher,arg,message", BAD_LAUNCHER_ARGS)
def test_bad_launcher_arguments_are_one_line_before_anything_is_written(tmp_path, capsys, launcher, arg,
                                                                        message):
    out = tmp_path / "s"
    err = _one_line_exit_2(["study", *TINY_FLAGS, "--launcher", launcher, "--launcher-arg", arg,
                            "--out", str(out)], capsys)
    assert message in err, err
    assert not out.exists()  # no study.yaml with the bad value, no folder
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()  # refused before Ray starts


def test_launcher_arguments_come_out_typed():
    got = launch_args.options("slurm", ("timeout_min=240", "slurm_partition=123", "mem_gb=7.5",
                                   "stderr_to_stdout=true", "slurm_setup=[module load cuda]", "cluster=local",
                                   "retries=0"))
    assert got == {"timeout_min": 240, "slurm_partition": "123", "mem_gb": 7.5, "stderr_to_stdout": True,
                   "slurm_setup": ["module load cuda"], "cluster": "local", "retries": 0}
    assert launch_args.options("ray", ("num_cpus=2", "num_gpus=0.5", "address=auto", "max_retries=-1")) == {
        "num_cpus": 2, "num_gpus": 0.5, "address": "auto", "max_retries": -1}
    with pytest.raises(UserError, match="launcher_args are for --launcher slurm or ray"):
        launch_args.options("local", ("num_cpus=2",))
    with pytest.raises(UserError, match="timeout_min is given twice"):
        launch_args.options("slurm", ("timeout_min=2", "timeout_min=3"))


def test_the_slurm_table_is_submitits_own():
    """Every key the table lets through is one submitit takes, with the type it asserts."""
    pytest.importorskip("submitit")
    from submitit.auto.auto import AutoExecutor
    from submitit.slurm.slurm import SlurmExecutor

    generic = AutoExecutor._typed_parameters()
    for key, kind in launch_args.LAUNCHER_ARGS["slurm"].items():
        if key in ("cluster", "retries"):  # vitscale's own
            continue
        if key.startswith("slurm_"):
            assert key.removeprefix("slurm_") in SlurmExecutor._valid_parameters() | set(generic), key
        else:
            assert key in generic, key
            assert kind.type is generic[key], key
    assert set(generic) <= set(launch_args.LAUNCHER_ARGS["slurm"])


# ----------------------------------------------------------------------------- 9: budgets and targets
@pytest.mark.parametrize("text", ["epochs:1e400", "compute:1e400", "compute:1e400ep", "time:1e400s",
                                  "time:1e400h", "epochs:1e99", "epochs:1e7", "compute:1e31", "compute:1e7ep",
                                  "time:1e9s", "time:1e6h"])
def test_budgets_beyond_any_machine_are_refused(text, capsys):
    with pytest.raises(UserError, match="out of range") as e:
        config.parse_budget(text)
    assert "\n" not in str(e.value)
    err = _one_line_exit_2(["study", *TINY_FLAGS, "--budget", text, "--plan"], capsys)
    assert f"budget {text!r}" in err and "out of range" in err, err


@pytest.mark.parametrize("text", ["compute:1e400", "compute:1e31", "time:1e400s", "time:1e12s"])
def test_targets_beyond_any_machine_are_refused(text, capsys):
    err = _one_line_exit_2(["study", *TINY_FLAGS, "--target", text, "--plan"], capsys)
    assert f"target {text!r}" in err and "out of range" in err, err


def test_budgets_in_range_still_parse():
    assert config.parse_budget("compute:1e30").amount == 1e30
    assert config.parse_budget("epochs:1e6").amount == 1e6
    assert config.parse_budget("time:1000h").amount == 3.6e6


# ----------------------------------------------------------------------------- 10: Slurm without Slurm
def test_slurm_without_sbatch_is_one_line_unless_the_local_executor_is_named(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no sbatch here
    out = tmp_path / "s"
    for extra in ([], ["--launcher-arg", "cluster=slurm"]):
        argv = ["study", *TINY_FLAGS, "--launcher", "slurm", *extra, "--out", str(out)]
        err = _one_line_exit_2(argv, capsys)
        assert "no Slurm here (sbatch not found)" in err and "cluster=local" in err, err
        assert not out.exists()
    with pytest.raises(UserError, match="no Slurm here"):
        SlurmLauncher(tmp_path / "slurm", {}, 0)
    named = SlurmLauncher(tmp_path / "slurm", {"cluster": "local"}, 0)
    assert named.executor.cluster == "local"


VALUES = [
    None,
    {"base": _sizing(32), "d-x2": _sizing(16)},
    SweepPoint(2e-3, 10, 3e9, 0.5, None, 0.05, 1.5),
    _seed("base", 0.5, 32),
    jobs.Failed("UserError", "a user's mistake"),
    {"val_top1": 0.5, "val_loss": math.nan, "test_top1": None},
]


@pytest.mark.parametrize("value", VALUES, ids=["none", "sizings", "sweep", "seed", "failed", "final"])
def test_a_jobs_value_goes_through_json_and_back(value):
    text = jobs.encode(value)
    json.loads(text)  # plain JSON: no code in it
    back = jobs.decode(text)
    if isinstance(value, dict) and "val_loss" in value:
        assert math.isnan(back.pop("val_loss")) and back == {"val_top1": 0.5, "test_top1": None}
    else:
        assert back == value


def test_decode_builds_only_the_known_records():
    with pytest.raises(ValueError, match="not a job value"):
        jobs.decode(json.dumps({"kind": "Popen", "version": 2, "args": ["sh"]}))
    assert isinstance(jobs.decode(jobs.encode(_seed("base", 0.5, 32))), SeedResult)
    assert isinstance(jobs.decode(jobs.encode({"b": _sizing(8)}))["b"], Sizing)


@pytest.mark.slow
def test_slurm_jobs_values_come_back_as_json_never_a_pickle(tmp_path, monkeypatch):
    """A job on submitit's local executor: its value is read from the JSON it wrote in the study's
    slurm folder; submitit's result pickle is never loaded here."""
    pytest.importorskip("submitit")
    from submitit.core import utils

    def no_pickle(path):
        raise AssertionError(f"a pickle was loaded from {path}")

    monkeypatch.setattr(utils, "pickle_load", no_pickle)
    cfg = tiny(tmp_path, strategies=("d",), factors=(1,))
    trials = plan(cfg)
    slurm = SlurmLauncher(tmp_path / "slurm", {"cluster": "local", "timeout_min": 5}, 0, 0.1)
    got = {}
    slurm.map([("sizing", size_all, (cfg, trials, reference_compute(trials), 1),
                tmp_path / "sizing.log")], got.__setitem__)
    assert isinstance(got["sizing"]["base"], Sizing)
    assert [p.name.split("_", 1)[1] for p in (tmp_path / "slurm").glob("*/*_value.json")] == ["value.json"]
    missing = tiny(tmp_path, out=str(tmp_path / "nothing"))  # a job's UserError comes back as one
    with pytest.raises(UserError, match="holds no study"):
        slurm.map([("bad", preview.collect, (missing,), tmp_path / "bad.log")], lambda *a: None)


# ----------------------------------------------------------------------------- the study's other flags
@pytest.mark.parametrize("flags,message", [
    (["--factors", "0"], "factors must be"),
    (["--factors", "nan"], "finite number"),
    (["--fractions", "2"], "fractions must be in (0, 1]"),
    (["--seeds", "0"], "seeds must be at least 1"),
    (["--workers", "-1"], "workers must be 0 (auto) or more"),
    (["--holdout", "-1"], "holdout must be 0"),
    (["--lrs", "nan"], "finite number"),
    (["--lrs", "-1"], "lrs must be positive"),
    (["--target", "epochs:3"], "give a compute"),
    (["--strategy", "q"], "strategy"),
    (["--strategy", "d,w,d"], "strategies must each be given once, got d,w,d"),
    (["--launcher", "local", "--launcher-arg", "x=1"], "launcher_args are for --launcher slurm or ray"),
])
def test_other_hostile_study_flags_are_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "s"
    err = _one_line_exit_2(["study", *TINY_FLAGS, *flags, "--plan", "--out", str(out)], capsys)
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize("factors", [(1, 1e9), (1, 2048), (1e-30, 1), (1 / 128, 1)])
def test_factors_beyond_what_the_scaler_can_build_are_refused(factors):
    """A factor of 1e9 planned a model of gigabytes (the plan counts its flops on the real model): up
    to 1024x (as far as the analysis' grid reaches), down to 1/64; checked on the config, before a plan."""
    with pytest.raises(UserError, match="factors must be between 1/64 and 1024") as e:
        config.StudyConfig(factors=factors)
    assert "\n" not in str(e.value)

