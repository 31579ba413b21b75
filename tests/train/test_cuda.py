"""vitscale on a CUDA device, each path against a reference: bf16 autocast against fp32, every SDPA
kernel against nn.MultiheadAttention's explicit attention, fp16 with its loss scale (steps taken,
overflows skipped), torch.compile against eager, FSDP on one GPU (a one-rank NCCL group) writing
sharded checkpoints against a plain run, and a resume bitwise equal to the run never stopped.

Marked `cuda`: skipped without a CUDA device (conftest), run by `make gpu-check` (pytest -m cuda).
The one-rank FSDP test also runs on the CPU (gloo), so its path is exercised everywhere."""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitscale.common import checkpoint
from vitscale.common.device import autocast
from vitscale.common.records import apply_overrides
from vitscale.models.presets import preset
from vitscale.models.vit import ViT
from vitscale.runs.evaluate import evaluate_run
from vitscale.train import amp, engine
from vitscale.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")
# a run small enough for seconds: pico/4 at 16 px on the digits, a checkpoint every step
FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "train.warmup_epochs=0", "train.label_smoothing=0", "train.keep_last=10", "train.ckpt_every=1"]


@pytest.fixture
def exact_fp32():
    """fp32 references in true fp32: TF32 off for matmuls and convolutions (the patch embedding)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.cuda
def test_bf16_autocast_logits_are_close_to_fp32s(exact_fp32):
    """S/16 at 224 px: bf16 (8 bits of mantissa, ~0.4% a rounding) through 12 blocks stays within a few
    percent of the fp32 logits and keeps fp32's most probable class among its five."""
    model = ViT(preset("S/16")).to(CUDA).eval()
    x = torch.randn(8, 3, 224, 224, device=CUDA)
    with torch.no_grad():
        want = model(x)
        with autocast(CUDA, "bf16"):
            got = model(x)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert relative_error(got, want) < 0.05
    assert (got.float().topk(5).indices == want.argmax(-1, keepdim=True)).any(-1).all()


def mha_reference(attn: torch.nn.Module, dim: int, heads: int) -> torch.nn.MultiheadAttention:
    """nn.MultiheadAttention holding vitscale's Attention weights (fused qkv in q, k, v order, proj)."""
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(CUDA)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha


BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_sdpa_kernel_equals_the_explicit_attention(backend, dtype, exact_fp32):
    """S/16's attention (197 tokens, 6 heads of 64) under each SDPA kernel, output and input gradient,
    against nn.MultiheadAttention's explicit softmax(q k^T / sqrt(d)) v (need_weights: its math path)
    in fp32. Flash attention has no fp32 kernel."""
    if backend == "flash" and dtype == "fp32":
        pytest.skip("flash attention runs in bf16 / fp16 only")
    block = ViT(preset("S/16")).to(CUDA).blocks[0].attn
    ref = mha_reference(block, 384, 6)
    x = torch.randn(4, 197, 384, device=CUDA, requires_grad=True)
    want, _ = ref(x, x, x, need_weights=True)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    kernels = BACKENDS[backend]
    with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
        with autocast(CUDA, dtype):
            got = block(x)
        (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
    tol = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}[dtype]
    assert relative_error(got, want) < tol
    assert relative_error(got_grad, want_grad) < 2 * tol


def train(out: Path, *overrides: str, device: str = "cuda") -> dict:
    cfg = apply_overrides(RunConfig(out=str(out)), [*FAST, f"train.device={device}", *overrides])
    return engine.train(cfg).metrics


def rows(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.at(run_dir, step) / "model.safetensors"))


@pytest.mark.cuda
def test_fp16_trains_with_a_loss_scale_on_cuda(tmp_path):
    """fp16 with GradScaler on CUDA: finite losses, every step taken at the initial scale, the weights
    moving; the scale checkpointed."""
    result = train(tmp_path / "fp16", "train.dtype=fp16")
    train_rows = rows(tmp_path / "fp16")
    assert len(train_rows) == 4 and all(math.isfinite(r["loss"]) for r in train_rows)
    assert [r["loss_scale"] for r in train_rows] == [2.0**16] * 4
    assert result["val_loss"] == result["val_loss"]
    first, last = weights(tmp_path / "fp16", 1), weights(tmp_path / "fp16", 4)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    state = json.loads((checkpoint.at(tmp_path / "fp16", 4) / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0**16


@pytest.mark.cuda
def test_fp16_overflows_on_cuda_are_skipped_and_the_scale_halves(tmp_path, monkeypatch, logged):
    """At a scale of 2^100 every fp16 backward overflows: CUDA's found-inf check skips each update
    (the weights stay) and halves the scale; the run goes on."""
    monkeypatch.setattr(amp.Scaler, "init_scale", 2.0**100)
    train(tmp_path / "over", "train.dtype=fp16")
    assert sum("fp16 gradients overflowed; update skipped" in s for s in logged) == 4
    assert [r["loss_scale"] for r in rows(tmp_path / "over")] == [2.0**99, 2.0**98, 2.0**97, 2.0**96]
    first, last = weights(tmp_path / "over", 1), weights(tmp_path / "over", 4)
    assert all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_compiled_model_equals_eager(dtype, exact_fp32):
    """Ti/16's shape at 224 px (4 blocks: a shorter compile) compiled by inductor: logits and every
    gradient as eager computes them, to the dtype's rounding (inductor fuses and reorders: not bitwise)."""
    torch.manual_seed(0)
    model = ViT(preset("Ti/16", depth=4)).to(CUDA)
    compiled = torch.compile(model)
    x = torch.randn(8, 3, 224, 224, device=CUDA)
    outs, grads = [], []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        with autocast(CUDA, dtype):
            out = m(x)
        out.float().logsumexp(-1).mean().backward()
        outs.append(out.detach().float())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    tol = {"fp32": 1e-4, "bf16": 3e-2}[dtype]
    assert relative_error(outs[1], outs[0]) < tol
    for name, want in grads[0].items():
        assert relative_error(grads[1][name], want) < 10 * tol, name


VITSCALE = (sys.executable, "-m", "vitscale")
ONE_RANK = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "vitscale")


def run_cli(*args: str, launcher: tuple[str, ...] = VITSCALE) -> str:
    """`vitscale ARGS` in a fresh process, as `launcher` starts it; its output, once it succeeded."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*launcher, *args], env=env, text=True, capture_output=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda),
                                    pytest.param("cpu", marks=pytest.mark.slow)])
def test_fsdp_on_one_device_writes_sharded_checkpoints_that_match_a_plain_run(device, tmp_path):
    """torchrun of one process: a one-rank group (NCCL on a GPU, gloo on the CPU), so train.fsdp and
    train.sharded_ckpt run on one device. Its weights, read whole from the shards, and its losses are
    the plain run's to rounding; vitscale eval reads its best/ shards in one process."""
    from vitscale.cli import main

    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    args = ["train", *(f"--{o}" for o in FAST), f"--train.device={device}",
            f"--train.dtype={'bf16' if device == 'cuda' else 'fp32'}"]
    run_cli(*args, "--train.fsdp=true", "--train.sharded_ckpt=true", "--out", str(sharded), launcher=ONE_RANK)
    assert main([*args, "--out", str(plain)]) == 0  # the same command, one process, no FSDP
    last = checkpoint.latest(sharded)
    assert checkpoint.is_sharded(last) and checkpoint.is_sharded(sharded / "best")
    assert checkpoint.world_of(json.loads((last / "state.json").read_text())) == 1
    got, want = checkpoint.read_shards(last), load_file(str(checkpoint.latest(plain) / "model.safetensors"))
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-4 * max(1.0, v.abs().max().item()), msg=k)
    assert [r["loss"] for r in rows(sharded)] == pytest.approx([r["loss"] for r in rows(plain)], rel=1e-3)
    final = json.loads((sharded / "final.json").read_text())
    said = evaluate_run(str(sharded), device=device)  # vitscale eval
    assert said["val_loss"] == pytest.approx(final["val_loss"], rel=1e-3)


DETERMINISTIC = (sys.executable, "-c", """
import os, sys
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # before cuBLAS starts: its deterministic workspace
import torch
# deterministic kernels where there are; an op without one warns (the bitwise check below judges)
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
from vitscale.cli import main
sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.cuda
def test_a_bf16_run_killed_on_cuda_resumes_bitwise(tmp_path):
    """With CUDA's deterministic algorithms (cuBLAS workspace, cuDNN, deterministic kernels), a bf16 run
    cut back to its step-2 checkpoint and resumed ends with the very weights and optimizer state of
    the run never stopped: RNG (CUDA's too), data order from two loader workers, and optimizer restored.
    (fp16's loss scale resumes bitwise in tests/train/test_amp.py.)"""
    args = ["train", *(f"--{o}" for o in FAST), "--train.device=cuda", "--train.dtype=bf16",
            "--data.workers=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli(*args, "--out", str(whole), launcher=DETERMINISTIC)
    shutil.copytree(whole, killed)
    for later in [checkpoint.at(killed, 3), checkpoint.at(killed, 4), killed / "best", killed / "final.json"]:
        shutil.rmtree(later) if later.is_dir() else later.unlink()
    out = run_cli(*args, "--out", str(killed), launcher=DETERMINISTIC)
    assert f"resumed from {checkpoint.at(killed, 2)} at step 2" in out, out
    for name in ("model", "optim"):
        a = load_file(str(checkpoint.at(whole, 4) / f"{name}.safetensors"))
        b = load_file(str(checkpoint.at(killed, 4) / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in rows(killed)] == [r["loss"] for r in rows(whole)]
