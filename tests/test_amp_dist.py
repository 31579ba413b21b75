"""Real processes: 2 gloo ranks under fp16 with activation checkpointing, with DDP and with FSDP
(ShardedGradScaler), follow one process's loss curve at the same global batch."""

import json
import os
import subprocess
import sys

import pytest

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["train", "--train.batch=32", "--train.max_steps=3", "--train.threads=1", "--data.image_size=16",
          "--model.patch_size=4", "--train.warmup_epochs=0", "--train.label_smoothing=0", "--train.knn_k=0"]


def train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow  # two runs, one of them 2 processes (~30 s beside other jobs)
@pytest.mark.parametrize("extra", [["--train.dtype=fp16", "--train.act_ckpt=true"],
                                   ["--train.dtype=fp16", "--train.act_ckpt=true", "--train.fsdp=true"]],
                         ids=["ddp-fp16-act_ckpt", "fsdp-fp16-act_ckpt"])
def test_two_gloo_ranks_match_one_process(tmp_path, extra):
    one_extra = [e for e in extra if e != "--train.fsdp=true"]
    single = subprocess.run([sys.executable, "-m", "vitscale", *COMMON, *one_extra, "--out",
                             str(tmp_path / "one")], env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "vitscale"]
    r = subprocess.run(launcher + COMMON + extra + ["--out", str(tmp_path / "two")], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-3, abs=1e-4)
