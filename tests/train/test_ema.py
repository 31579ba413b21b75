"""train.ema: the moving average of the weights, evaluated, checkpointed, resumed and used by --init."""

import json
import shutil

import pytest
import ranks
import torch
from safetensors.torch import load_file

from vitscale import weights
from vitscale.cli import main
from vitscale.common.checkpoint import at
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides
from vitscale.runs.evaluate import evaluate_run
from vitscale.train import engine
from vitscale.train.config import RunConfig
from vitscale.train.ema import EMA

FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "train.warmup_epochs=0", "train.keep_last=10", "train.ckpt_every=1"]


def run(out, *overrides, init=""):
    cfg = apply_overrides(RunConfig(out=str(out), init=init), FAST + list(overrides))
    return cfg, engine.train(cfg).metrics


def tensors(run_dir, step, name):
    return load_file(str(at(run_dir, step) / f"{name}.safetensors"))


def test_ema_with_decay_zero_equals_the_raw_weights():
    model, moved = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ema = EMA(model, 0.0)
    ema.update(moved)
    for mine, theirs in zip(ema.module.parameters(), moved.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_ema_follows_the_closed_form_of_the_run_s_own_weights(tmp_path):
    """ema_t = d * ema_{t-1} + (1 - d) * w_t, against the weights each step's checkpoint holds."""
    d = 0.9
    run(tmp_path / "r", f"train.ema={d}")
    for step in (2, 3, 4):
        before, w, now = tensors(tmp_path / "r", step - 1, "ema"), tensors(tmp_path / "r", step, "model"), \
            tensors(tmp_path / "r", step, "ema")
        assert now.keys() == w.keys()
        moved = False
        for k, v in now.items():
            expected = d * before[k] + (1 - d) * w[k]
            torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-7)
            moved |= not torch.equal(v, w[k]) and not torch.equal(v, before[k])
        assert moved  # a real average: neither the weights nor the previous average


def test_ema_is_evaluated_beside_the_raw_weights(tmp_path):
    _, result = run(tmp_path / "r", "train.ema=0.5")
    assert {"val_top1", "val_loss", "ema_val_top1", "ema_val_loss"} <= set(result)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "ema_val_top1" in [r for r in rows if r["split"] == "val"][-1]
    again = evaluate_run(str(tmp_path / "r"), device="cpu")  # vitscale eval: best/, both weights
    assert again["ema_val_top1"] == result["ema_val_top1"] and again["val_top1"] == result["val_top1"]
    _, plain = run(tmp_path / "plain")
    assert not any(k.startswith("ema_") for k in plain)
    assert not (at(tmp_path / "plain", 4) / "ema.safetensors").exists()


def test_ema_with_decay_zero_in_a_run_is_its_weights(tmp_path):
    _, result = run(tmp_path / "r", "train.ema=0")  # off: nothing
    assert "ema_val_top1" not in result
    _, result = run(tmp_path / "z", "train.ema=1e-300")  # (1 - d) == 1 in float32: a copy each step
    w, ema = tensors(tmp_path / "z", 4, "model"), tensors(tmp_path / "z", 4, "ema")
    assert all(torch.equal(w[k], ema[k]) for k in w)
    assert result["ema_val_top1"] == result["val_top1"]


def test_a_resumed_run_with_ema_ends_bitwise_as_an_uninterrupted_one(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(whole, "train.ema=0.9")
    shutil.copytree(whole, killed)
    for gone in (at(killed, 3), at(killed, 4), killed / "best", killed / "final.json"):  # killed at step 2
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    run(killed, "train.ema=0.9")
    for name in ("model", "ema"):
        a, b = tensors(whole, 4, name), tensors(killed, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_resume_that_changes_train_ema_is_refused(tmp_path):
    run(tmp_path / "r", "train.ema=0.9", "train.max_steps=2")
    with pytest.raises(UserError, match="train.ema"):
        run(tmp_path / "r", "train.ema=0.5", "train.max_steps=2")


def test_init_from_a_run_with_ema_loads_its_ema_weights(tmp_path):
    run(tmp_path / "r", "train.ema=0.9")
    ema, raw = load_file(str(tmp_path / "r" / "best" / "ema.safetensors")), \
        load_file(str(tmp_path / "r" / "best" / "model.safetensors"))
    for source, want in [(tmp_path / "r", ema), (tmp_path / "r" / "best", ema),
                         (tmp_path / "r" / "best" / "model.safetensors", raw)]:
        read = weights.read(source)
        for k, v in read.state.items():
            if k != "pos_embed":  # a fixed table, recomputed
                assert torch.equal(v, want["vit." + k]), (source, k)
        assert ("EMA" in " ".join(read.notes)) == (want is ema)
    cfg, _ = run(tmp_path / "ft", "train.max_steps=1", "train.base_lr=0", init=str(tmp_path / "r"))
    started = tensors(tmp_path / "ft", 1, "model")  # base_lr 0: the encoder stays as --init left it
    for k, v in ema.items():
        if k.startswith("vit.blocks."):
            assert torch.equal(started[k], v), k


def test_ema_settings_are_checked():
    with pytest.raises(UserError, match="train.ema must be in"):
        apply_overrides(RunConfig(), ["train.ema=1"])
    with pytest.raises(UserError, match="train.ema cannot be used with train.fsdp"):
        apply_overrides(RunConfig(), ["train.ema=0.99", "train.fsdp=true"])


@pytest.mark.slow
def test_two_ddp_ranks_keep_the_ema_of_one_process(tmp_path):
    """Under DDP (2 gloo ranks) every rank averages its own copy; the checkpointed EMA is one process's."""
    common = ["train", "--train.ema=0.9", "--train.label_smoothing=0",
              *(f"--{o}" for o in FAST if o.split("=")[0] not in ("train.keep_last", "train.ckpt_every",
                                                                 "train.max_steps")), "--train.max_steps=2"]
    ranks.vitscale_here(*common, "--out", str(tmp_path / "two"))
    assert main([*common, "--out", str(tmp_path / "one")]) == 0  # in this process: no torch to import again
    one, two = tensors(tmp_path / "one", 2, "ema"), tensors(tmp_path / "two", 2, "ema")
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)
    assert "ema_val_top1" in json.loads((tmp_path / "two" / "final.json").read_text())
