"""Real processes: SIGKILL then resume gives bitwise-identical weights; 2-rank DDP (gloo)
matches one process at the same global batch."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ranks
import torch
from safetensors.torch import load_file

from vitscale.cli import main
from vitscale.common import checkpoint
from vitscale.common.checkpoint import latest
from vitscale.train import optim

# 512 items: 16 steps an epoch, so a 30-step run resumes across an epoch's end and its evaluation
ARGS = ["train", "--train.batch=32", "--train.max_steps=30", "--train.ckpt_every=2", "--train.threads=1",
        "--data.image_size=16", "--model.patch_size=4", "--train.warmup_epochs=0", "--model.drop_path=0.1",
        "--train.mixup=0.2", "--train.cutmix=0.2", "--data.train_size=512"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def vitscale(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vitscale", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def final_tensors(run_dir: Path) -> dict:
    ckpt = latest(run_dir)
    return load_file(str(ckpt / "model.safetensors")) | {
        f"optim/{k}": v for k, v in load_file(str(ckpt / "optim.safetensors")).items()}


def kill_after(proc: subprocess.Popen, run_dir: Path, step: int, last: int = 30) -> None:
    """SIGKILL a run somewhere after its checkpoint of `step` exists, before that of its `last` step."""
    deadline = time.time() + 120
    while latest(run_dir) is None or checkpoint.step_of(latest(run_dir)) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.05))  # somewhere between checkpoints, maybe in the middle of writing one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.step_of(latest(run_dir)) < last, "the run ended before the kill"


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, capsys):
    killed = vitscale(*ARGS, "--out", str(tmp_path / "killed"))
    kill_after(killed, tmp_path / "killed", 6)
    # the resume and the uninterrupted reference need no process of their own: in this one
    capsys.readouterr()
    assert main([*ARGS, "--out", str(tmp_path / "killed")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main([*ARGS, "--out", str(tmp_path / "whole")]) == 0
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 31))


@pytest.mark.slow
def test_sigkilled_cooldown_branch_resumes_to_the_plain_wsd_run(tmp_path, capsys):
    """A stable run to step 15, a 30-step branch from it killed and resumed, ends bitwise where a
    30-step wsd run from scratch ends (weights and optimizer state); the branch point is mid-epoch."""
    wsd = [a for a in ARGS if not a.startswith("--train.max_steps")] + ["--train.schedule=wsd"]
    start = optim.decay_start(30, 0.5)
    # the stable run is not the one killed: it needs no process of its own
    stable = [*wsd, f"--train.max_steps={start}", "--train.decay_frac=0", "--out", str(tmp_path / "stable")]
    assert main(stable) == 0
    branch_args = [*wsd, "--train.max_steps=30", "--train.decay_frac=0.5", "--out", str(tmp_path / "branch"),
                   f"--train.branch_from={checkpoint.at(tmp_path / 'stable', start)}"]
    branch = vitscale(*branch_args)
    kill_after(branch, tmp_path / "branch", start + 4)
    assert f"branched from {tmp_path / 'stable'}" in branch.stdout.read()
    # the resume and the plain run need no process of their own: in this one
    capsys.readouterr()
    assert main(branch_args) == 0
    assert f"resumed from {tmp_path / 'branch'}" in capsys.readouterr().out
    plain = [*wsd, "--train.max_steps=30", "--train.decay_frac=0.5", "--out", str(tmp_path / "plain")]
    assert main(plain) == 0
    a, b = final_tensors(tmp_path / "plain"), final_tensors(tmp_path / "branch")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


FP16 = ["--train.dtype=fp16", "--train.act_ckpt=true"]  # a loss scale (sharded under FSDP), blocks recomputed


COMMON = ["train", "--train.batch=32", "--train.max_steps=5", "--train.threads=1", "--data.image_size=16",
          "--model.patch_size=4", "--train.warmup_epochs=0", "--train.label_smoothing=0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of COMMON + extra (ddp and fsdp share theirs): its train losses. Run in
    this process (no torch to import again)."""
    done = {}

    def losses(extra: tuple[str, ...]) -> list[float]:
        if extra not in done:
            out = tmp_path_factory.mktemp("one")
            assert main([*COMMON, *extra, "--out", str(out)]) == 0
            done[extra] = train_losses(out)
        return done[extra]

    return losses


# Each case starts a rank process whose start-up costs more than its steps, so the features ride
# together: a loss scale with multigrid's changing batch under DDP, and sharded.
@pytest.mark.parametrize("extra,rel", [
    pytest.param([], 1e-4, id="ddp"),
    pytest.param(["--train.fsdp=true"], 1e-4, id="fsdp"),
    pytest.param(FP16 + ["--train.multigrid=short"], 1e-3, marks=pytest.mark.slow,  # 4, 2, 1 x the batch
                 id="ddp-fp16-act_ckpt-multigrid"),
    pytest.param(FP16 + ["--train.fsdp=true"], 1e-3, marks=pytest.mark.slow, id="fsdp-fp16-act_ckpt"),
])
def test_two_gloo_ranks_match_one_process(tmp_path, one_process, extra, rel):
    ranks.vitscale_here(*COMMON, *extra, "--out", str(tmp_path / "two"))
    one = one_process(tuple(e for e in extra if e != "--train.fsdp=true"))
    two = train_losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=rel, abs=rel / 10)
