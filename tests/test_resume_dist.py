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
import torch
from safetensors.torch import load_file

from vitscale.checkpoint import latest

ARGS = ["train", "--train.batch=32", "--train.max_steps=60", "--train.ckpt_every=2", "--train.threads=1",
        "--data.image_size=16", "--model.patch_size=4", "--train.warmup_epochs=0", "--model.drop_path=0.1",
        "--train.mixup=0.2", "--train.cutmix=0.2"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def vitscale(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vitscale", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def final_tensors(run_dir: Path) -> dict:
    ckpt = latest(run_dir)
    return load_file(str(ckpt / "model.safetensors")) | {
        f"optim/{k}": v for k, v in load_file(str(ckpt / "optim.safetensors")).items()}


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    whole = vitscale(*ARGS, "--out", str(tmp_path / "whole"))
    killed = vitscale(*ARGS, "--out", str(tmp_path / "killed"))
    deadline = time.time() + 120
    while latest(tmp_path / "killed") is None or latest(tmp_path / "killed").name < "ckpt-00000006":
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.05))  # somewhere between checkpoints, maybe in the middle of writing one
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert latest(tmp_path / "killed").name < "ckpt-00000060", "the run ended before the kill"
    resumed = vitscale(*ARGS, "--out", str(tmp_path / "killed"))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resumed from" in out, out
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    a, b = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 61))


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path, sharding):
    common = ["train", "--train.batch=32", "--train.max_steps=5", "--train.threads=1", "--data.image_size=16",
              "--model.patch_size=4", "--train.warmup_epochs=0", "--train.label_smoothing=0"]
    single = vitscale(*common, "--out", str(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    extra = ["--train.fsdp=true"] if sharding == "fsdp" else []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vitscale"]
    r = subprocess.run(launcher + common + extra + ["--out", str(tmp_path / "two")], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
