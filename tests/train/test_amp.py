"""train.dtype=fp16: autocast to float16 with a dynamic loss scale (vitscale.train.amp.Scaler, torch's
GradScaler), on CPU as on CUDA; skipped overflow steps, clipping of the true gradients, the scale
checkpointed and resumed, and a non-finite loss still stopping the run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vitscale.common import checkpoint
from vitscale.common.checkpoint import at
from vitscale.common.device import autocast
from vitscale.common.errors import StopTraining
from vitscale.common.records import apply_overrides
from vitscale.train import amp, engine
from vitscale.train.config import RunConfig

# Evaluation splits of 5%: float16 on a CPU is slow, and the figures checked need only be finite.
FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "train.warmup_epochs=0", "train.keep_last=10", "train.ckpt_every=1", "train.dtype=fp16",
        "data.val_fraction=0.05", "data.test_fraction=0.05"]
CPU = torch.device("cpu")


def run(out, *overrides):
    cfg = apply_overrides(RunConfig(out=str(out)), FAST + list(overrides))
    return engine.train(cfg).metrics


def weights(run_dir, step):
    return load_file(str(at(run_dir, step) / "model.safetensors"))


def scaler_state(run_dir, step):
    return json.loads((at(run_dir, step) / "state.json").read_text())["scaler"]


def _model_and_batch():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)), \
        torch.randn(4, 8), torch.tensor([0, 1, 2, 0])


def _step(model, x, y, scaler, clip=0.0, dtype="fp16"):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with autocast(CPU, dtype):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.backward(loss)
    return scaler.step(opt, model.parameters(), clip)


def test_fp16_autocast_runs_in_float16_on_cpu():
    model, x, _ = _model_and_batch()
    with autocast(CPU, "fp16"):
        assert model(x).dtype == torch.float16


def test_a_scaled_fp16_step_matches_an_fp32_step():
    """The scale is taken out before the update: the same SGD step as fp32, to fp16's precision."""
    model, x, y = _model_and_batch()
    ref = _model_and_batch()[0]
    assert _step(model, x, y, amp.Scaler("fp16", CPU))
    assert _step(ref, x, y, amp.Scaler("fp32", CPU), dtype="fp32")
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_clip_grad_clips_the_unscaled_gradients():
    """Clipped at norm 0.01 under a 2^16 scale: SGD(lr=1) moves the weights by exactly norm 0.01
    (clipping the scaled gradients would move them by 0.01 / 65536)."""
    model, x, y = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = amp.Scaler("fp16", CPU)
    assert scaler.scale == 2.0**16 and _step(model, x, y, scaler, clip=0.01)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-3)


def test_an_overflowing_step_is_skipped_and_the_scale_halved(monkeypatch):
    monkeypatch.setattr(amp.Scaler, "init_scale", 2.0**100)  # the fp16 backward overflows at once
    model, x, y = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = amp.Scaler("fp16", CPU)
    assert not _step(model, x, y, scaler)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # untouched
    assert scaler.scale == 2.0**99 and scaler.skipped == 1 and not scaler.broken


def test_a_scale_that_keeps_falling_is_broken():
    """Gradients that are NaN at every scale: halved each step until below MIN_SCALE."""
    w = torch.nn.Parameter(torch.ones(2))
    monkey = amp.Scaler("fp16", CPU)
    monkey.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt = torch.optim.SGD([w], lr=1.0)
    seen = []
    for _ in range(3):
        monkey.backward((w * float("nan")).sum())
        assert not monkey.step(opt, [w])
        opt.zero_grad()
        seen.append((monkey.scale, monkey.broken))
    assert seen == [(2.0, False), (1.0, False), (0.5, True)]
    assert torch.equal(w.detach(), torch.ones(2))


def test_fp32_and_bf16_take_plain_steps():
    for dtype in ("fp32", "bf16"):
        scaler = amp.Scaler(dtype, CPU)
        assert not scaler.enabled and scaler.state_dict() is None and scaler.scale == 1.0


@pytest.mark.slow  # two runs (~4 s beside other jobs)
def test_overflow_steps_do_not_stop_a_run_and_the_scale_resumes(tmp_path, monkeypatch, logged):
    """Every step overflows at 2^100: the run goes on (its loss is finite), nothing moves, and the
    scale halves each step; a run killed at step 2 resumes at 2^98, not at the initial scale."""
    monkeypatch.setattr(amp.Scaler, "init_scale", 2.0**100)
    run(tmp_path / "whole")
    assert sum("fp16 gradients overflowed; update skipped" in s for s in logged) == 4
    assert [scaler_state(tmp_path / "whole", s)["scale"] for s in (1, 2, 3, 4)] == [2.0**99, 2.0**98,
                                                                                  2.0**97, 2.0**96]
    first, last = weights(tmp_path / "whole", 1), weights(tmp_path / "whole", 4)
    assert all(torch.equal(first[k], last[k]) for k in first)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    for gone in (at(killed, 3), at(killed, 4), killed / "best", killed / "final.json"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    run(killed)
    assert scaler_state(killed, 4) == scaler_state(tmp_path / "whole", 4)


@pytest.mark.slow  # two runs (~4 s beside other jobs)
def test_an_fp16_run_logs_its_scale_evaluates_and_resumes_bitwise(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = run(whole)
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in rows if r["split"] == "train"] == [2.0**16] * 4
    assert 0.0 <= result["val_top1"] <= 1.0 and result["val_loss"] == result["val_loss"]  # finite
    assert scaler_state(whole, 4)["scale"] == 2.0**16
    shutil.copytree(whole, killed)
    for gone in (at(killed, 3), at(killed, 4), killed / "best", killed / "final.json"):  # killed at step 2
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    run(killed)
    a, b = weights(whole, 4), weights(killed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_under_fp16_still_stops_the_run(tmp_path):
    """The loss scale mends the backward only: a forward that overflows (here an LR that blows the
    weights up) stops the run as under fp32."""
    with pytest.raises(StopTraining, match="loss is"):
        run(tmp_path / "r", "train.base_lr=1e6", "train.max_steps=30", "train.ckpt_every=0")


def test_fp16_with_fsdp_takes_the_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    assert apply_overrides(RunConfig(), ["train.dtype=fp16", "train.fsdp=true"]).train.fsdp
    assert isinstance(amp.Scaler("fp16", CPU, sharded=True).scaler, ShardedGradScaler)
    assert type(amp.Scaler("fp16", CPU).scaler) is torch.amp.GradScaler


def test_a_checkpoint_with_a_damaged_loss_scale_is_passed_over(tmp_path):
    run(tmp_path / "r", "train.max_steps=2")
    path = at(tmp_path / "r", 2) / "state.json"
    state = json.loads(path.read_text())
    checkpoint.load(at(tmp_path / "r", 2))  # whole as written
    for bad in ["x", {"scale": float("nan"), "_growth_tracker": 0}, {"scale": 2.0}]:
        path.write_text(json.dumps(state | {"scaler": bad}))
        with pytest.raises(checkpoint.Damaged, match="loss scaler state"):
            checkpoint.load(at(tmp_path / "r", 2))
        assert checkpoint.last_good(tmp_path / "r") == at(tmp_path / "r", 1)
