"""Two writers, signals, torchrun ranks (issue 10, items 3, 4, 17, 18): one process per run or
study directory; a signal ends a run at a checkpoint with one line and exit 4; every rank
draws its own randomness and resumes its own; ranks learn rank 0's answers, never poll."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import ranks
import torch
from safetensors.torch import load_file

from vitscale.cli import main
from vitscale.common import checkpoint, dist, lock, signals
from vitscale.common.errors import Interrupted, UserError
from vitscale.common.records import apply_overrides
from vitscale.study import runner as study
from vitscale.study.pool import Runner
from vitscale.train import engine
from vitscale.train.config import RunConfig

FAST = ["train.batch=32", "train.max_steps=6", "train.threads=1", "train.knn_k=5", "data.image_size=16",
        "model.patch_size=4", "train.warmup_epochs=0", "model.drop_path=0.1", "train.mixup=0.2"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def config(tmp_path, name, *overrides):
    return apply_overrides(RunConfig(out=str(tmp_path / name)), FAST + list(overrides))


def tensors(run_dir: Path) -> dict:
    ckpt = checkpoint.latest(run_dir)
    return load_file(str(ckpt / "model.safetensors")) | {
        f"optim/{k}": v for k, v in load_file(str(ckpt / "optim.safetensors")).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(directory: Path, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / lock.NAME
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                "birth": ""} | holder))
    return path


# ----------------------------------------------------------------------------- item 3: locks
def test_a_run_directory_in_use_is_refused_in_one_line(tmp_path, capsys):
    path = write_lock(tmp_path / "run")  # held by this (live) process
    code = main(["train", "--out", str(tmp_path / "run"), *(f"--{o}" for o in FAST)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"process {os.getpid()} on {socket.gethostname()}" in err and "choose another --out" in err
    assert path.exists() and sorted(p.name for p in (tmp_path / "run").iterdir()) == [lock.NAME]


def test_a_lock_held_on_another_host_names_the_file_to_delete(tmp_path):
    path = write_lock(tmp_path / "run", host="some-other-node")
    with pytest.raises(UserError, match=f"some-other-node.*delete {path}"):
        lock.acquire(tmp_path / "run")


def test_a_stale_lock_is_taken_over_with_a_note_and_given_back(tmp_path, logged):
    write_lock(tmp_path / "run", pid=dead_pid())
    with lock.held(tmp_path / "run", dist.Dist()) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(logged) == 1 and "is gone; taking it over" in logged[0], logged
    assert not (tmp_path / "run" / lock.NAME).exists()  # given back at the end


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """A container restarted gives the new run the old run's PID: the start time tells them apart."""
    write_lock(tmp_path / "run", birth="1")  # this PID, but a process started at another time
    lock.release(lock.acquire(tmp_path / "run"))


def test_an_unreadable_lock_is_taken_over_with_a_note(tmp_path, logged):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / lock.NAME).write_text("{not json")
    lock.release(lock.acquire(tmp_path / "run"))
    assert len(logged) == 1 and "could not be read; taking it over" in logged[0]


def test_ctrl_c_outside_training_is_one_line_and_exit_4(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("vitscale.cli.commands.cmd_models", interrupted)
    assert main(["models"]) == 4
    assert capsys.readouterr().err == "vitscale: interrupted: SIGINT\n"


def test_a_refused_run_leaves_no_directory_behind(tmp_path):
    with lock.held(tmp_path / "new", dist.Dist()), pytest.raises(UserError, match="in use"):
        lock.acquire(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_study_in_use_is_refused_but_its_trials_lock_their_own_runs(tmp_path):
    cfg = study.StudyConfig(out=str(tmp_path / "study"))
    with lock.held(tmp_path / "study", dist.Dist()):
        with pytest.raises(UserError, match="study directory .* in use by process"):
            study.run_study(cfg)
        # a trial's run inside the study directory has a lock of its own
        with lock.held(tmp_path / "study" / "trials" / "base" / "seed0" / "stable", dist.Dist()):
            pass


# ----------------------------------------------------------------------------- item 4: signals
def _signal_at(monkeypatch, step: int, signum=signal.SIGTERM):
    real = engine.Job.train_step

    def train_step(self, *args):
        if self.step == step - 1:
            os.kill(os.getpid(), signum)  # arrives in the middle of the step
        return real(self, *args)

    monkeypatch.setattr(engine.Job, "train_step", train_step)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_each_signal_ends_the_step_with_a_checkpoint(tmp_path, monkeypatch, signum):
    _signal_at(monkeypatch, 2, signum)
    with pytest.raises(Interrupted, match=f"{signal.Signals(signum).name} at step 2 of 6.*resume"):
        engine.train(config(tmp_path, "cut"))
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "cut")) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signals.received() is None


def test_a_signalled_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = config(tmp_path, "whole")
    engine.train(whole)
    cut = config(tmp_path, "cut")
    with monkeypatch.context() as m:
        _signal_at(m, 3)
        with pytest.raises(Interrupted, match="SIGTERM at step 3 of 6.*resume"):
            engine.train(cut)
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "cut")) == 3
    assert not (tmp_path / "cut" / lock.NAME).exists()
    engine.train(cut)
    assert same(tensors(tmp_path / "whole"), tensors(tmp_path / "cut"))


def test_a_signal_at_an_epoch_end_evaluates_that_epoch_first(tmp_path, monkeypatch):
    cut = config(tmp_path, "cut", "data.train_size=128", "data.name=cluttered-digits", "data.val_size=64",
                 "train.max_steps=0", "train.epochs=2")  # 4 steps an epoch
    _signal_at(monkeypatch, 4)
    with pytest.raises(Interrupted, match="at step 4 of 8"):
        engine.train(cut)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [4] and (tmp_path / "cut" / "best").is_dir()


def _vitscale(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vitscale", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _wait_for_steps(proc, run_dir: Path, steps: int = 2) -> None:
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_cli_run_exits_4_in_one_line_and_resumes(tmp_path, capsys, signum):
    """A second process on the same --out is refused while the first trains; the first, signalled,
    writes a checkpoint, says how to resume in one line and exits 4; run again, it finishes."""
    args = ["train", "--out", str(tmp_path / "run"), *(f"--{o}" for o in FAST), "--train.max_steps=40"]
    proc = _vitscale(*args)
    _wait_for_steps(proc, tmp_path / "run")
    assert main(args) == 2  # refused before it reads any data
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by process {proc.pid}" in err, err
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert err.count("\n") == 1 and err.startswith("vitscale: interrupted: ") and "resume" in err, err
    step = checkpoint.step_of(checkpoint.latest(tmp_path / "run"))
    assert 2 <= step < 40 and f"at step {step} of 40" in err
    assert not (tmp_path / "run" / lock.NAME).exists()
    again = main(args)  # resumed in this process: the signal's process is the one under test
    assert again == 0 and f"resumed from {checkpoint.at(tmp_path / 'run', step)}" in capsys.readouterr().out


def _until_a_signal(seconds: float) -> str:
    """A pool job that runs until a signal reaches its worker (as a training run checks each step)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        signals.check("the job stopped")
        time.sleep(0.01)
    return "ran to the end"


@pytest.mark.slow
def test_a_signal_to_the_study_reaches_its_workers_and_stops_it(tmp_path):
    """`kill STUDY_PID` signals the study's process alone: it passes the signal on to its pool's
    workers, whose jobs stop, and the study raises Interrupted instead of waiting for them."""
    runner = Runner(2)
    logs = [tmp_path / f"job{i}.txt" for i in range(3)]

    def signal_once_started():
        while not all(p.exists() for p in logs[:2]):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_started, daemon=True).start()
    t0 = time.time()
    try:
        with pytest.raises(Interrupted, match="SIGTERM; the job stopped"):
            runner.map([(f"job{i}", _until_a_signal, (120,), p) for i, p in enumerate(logs)], lambda *a: None)
    finally:
        runner.close()
    assert time.time() - t0 < 60  # a job a worker took after the signal stopped at once too


# ----------------------------------------------------------------------------- items 17, 18: ranks
def test_each_rank_seeds_its_own_stream():
    seeds = {engine.rank_seed(s, r) for s in (0, 1) for r in range(4)}
    assert len(seeds) == 8  # seed 1 rank 0 is not seed 0 rank 1


def test_ranks_answer_from_rank_0_in_one_process():
    assert dist.on_main(dist.Dist(), lambda: 3) == 3
    with pytest.raises(UserError, match="budget"):
        dist.on_main(dist.Dist(), lambda: (_ for _ in ()).throw(UserError("budget too small")))


def _rank_processes(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the processes a torchrun launched."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(x for x in status.read_text().splitlines() if x.startswith("PPid:")).split()[1])
            env = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if ppid == launcher.pid and rank:
            found[int(rank[0][5:])] = int(status.parent.name)
    return found


def _torchrun(*args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vitscale"]
    return subprocess.Popen(launcher + list(args), env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_gloo_ranks_draw_their_own_masks_stop_together_and_resume_exactly(tmp_path, capsys):
    """MAE with drop-path on 2 gloo ranks under torchrun: SIGTERM to rank 1 alone stops both at one
    step with a checkpoint; the ranks' saved generators differ (so do their masks); resumed, the run
    ends bitwise where an uninterrupted one does."""
    args = ["pretrain", "--train.batch=32", "--train.max_steps=20", "--train.threads=1",
            "--data.image_size=16", "--model.patch_size=4", "--train.warmup_epochs=0",
            "--model.drop_path=0.1",
            "--mae.decoder_width=32", "--mae.decoder_depth=1", "--mae.decoder_heads=2", "--train.knn_k=5"]
    cut = _torchrun(*args, "--out", str(tmp_path / "cut"))
    _wait_for_steps(cut, tmp_path / "cut", 3)
    os.kill(_rank_processes(cut)[1], signal.SIGTERM)
    out = cut.communicate(timeout=300)[0]
    assert out.count("vitscale: interrupted: SIGTERM") == 1, out  # rank 1's; rank 0 stopped with it
    step = checkpoint.step_of(checkpoint.latest(tmp_path / "cut"))
    assert f"at step {step} of 20" in out and step < 20
    rng = load_file(str(checkpoint.latest(tmp_path / "cut") / "rng.safetensors"))
    assert not torch.equal(rng["torch"], rng["rank1/torch"])
    masks = []
    for key in ("torch", "rank1/torch"):
        torch.set_rng_state(rng[key])
        masks.append(torch.rand(8, 16).argsort(dim=1))  # as models.mae.random_masking draws
    assert not torch.equal(*masks)
    # torchrun is the subject of the signalled run alone: the others run rank 0 in this process
    assert "resumed from" in ranks.vitscale_here(*args, "--out", str(tmp_path / "cut"), capsys=capsys)
    ranks.vitscale_here(*args, "--out", str(tmp_path / "whole"))
    assert same(tensors(tmp_path / "whole"), tensors(tmp_path / "cut"))


def _rank_main(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    # a rank whose peer died gives up after 3 minutes instead of dist's 30
    td.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                          timeout=timedelta(minutes=3))
    d = dist.Dist(rank, 2)

    def size():  # rank 0 finds the budget too small after a while; rank 1 must not wait forever
        time.sleep(0.5)
        raise UserError("budget 'compute:1' is too small to train trial base")

    try:
        dist.on_main(d, size)
    except UserError as e:
        Path(out, str(rank)).write_text(str(e))
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_rank_0s_mistake_ends_every_rank_with_its_line(tmp_path):
    ranks.rank_0_here(_rank_main, str(tmp_path / "init"), str(tmp_path))
    assert (tmp_path / "0").read_text() == (tmp_path / "1").read_text() != ""
