"""The engine: one loop for every task, accumulation, schedules, init, stops, pictures."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vitscale import tasks
from vitscale.common.checkpoint import latest
from vitscale.common.records import apply_overrides
from vitscale.train import engine, optim
from vitscale.train.config import RunConfig

FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "train.knn_k=5",
        "data.image_size=16", "model.patch_size=4", "train.warmup_epochs=0"]


def run(tmp_path, name, *overrides, task="supervised", init=""):
    cfg = RunConfig(task=task, init=init, out=str(tmp_path / name))
    cfg = apply_overrides(cfg, FAST + list(overrides))
    return cfg, engine.train(cfg).metrics


def losses(cfg):
    with open(f"{cfg.out}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_supervised_run_writes_everything(tmp_path):
    cfg, result = run(tmp_path, "sup")
    names = {p.name for p in (tmp_path / "sup").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "final.json", "best"} <= names
    assert "curves.png" not in names  # the command draws it (tests/cli), not the engine
    assert 0 <= result["val_top1"] <= result["val_top5"] <= 1 and len(losses(cfg)) == 4  # 10 classes
    assert json.loads((tmp_path / "sup" / "final.json").read_text())["step"] == 4


def test_top_k_is_the_share_of_labels_among_the_k_highest_logits():
    from vitscale.tasks.evaluate import top_k

    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = torch.tensor([2, 0, 0, 2])  # ranks of the label: 2nd, 1st, 3rd, 3rd
    assert (top_k(logits, y, 1), top_k(logits, y, 2), top_k(logits, y, 3)) == (0.25, 0.5, 1.0)


def test_a_finished_run_run_again_keeps_its_result(tmp_path):
    """Re-running a finished run, or one killed between its last checkpoint and final.json,
    returns (and keeps) the final evaluation instead of writing one without metrics."""
    cfg, first = run(tmp_path, "done")
    final = tmp_path / "done" / "final.json"
    again = engine.train(cfg).metrics
    assert again == first and json.loads(final.read_text())["val_top1"] == first["val_top1"]
    final.unlink()  # as a kill right after the last checkpoint leaves it
    rows = losses(cfg)
    again = engine.train(cfg).metrics
    assert again["val_top1"] == first["val_top1"] and again["val_loss"] == pytest.approx(first["val_loss"])
    assert json.loads(final.read_text())["val_top1"] == first["val_top1"] and losses(cfg) == rows


def test_accumulation_keeps_the_effective_batch(tmp_path):
    one, _ = run(tmp_path, "a1", "train.label_smoothing=0")
    two, _ = run(tmp_path, "a2", "train.label_smoothing=0", "train.accum=2")
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)


def test_mae_pretrain_then_linear_probe_and_finetune(tmp_path, logged):
    mae_overrides = ["mae.decoder_width=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]
    pre, result = run(tmp_path, "mae", *mae_overrides, task="mae")
    assert {"val_loss", "knn_top1"} <= set(result)
    assert list((tmp_path / "mae").glob("recon-epoch*.png"))
    encoder_before = load_file(str(latest(tmp_path / "mae") / "model.safetensors"))
    probe, result = run(tmp_path, "probe", task="linprobe", init=pre.out)
    probe_state = load_file(str(latest(tmp_path / "probe") / "model.safetensors"))
    for k, v in encoder_before.items():  # the probe never moves the encoder
        if k.startswith("mae.encoder."):
            assert torch.equal(probe_state["vit." + k[len("mae.encoder."):]], v)
    _, result = run(tmp_path, "ft", "train.layer_decay=0.75", task="finetune", init=pre.out)
    assert "val_top1" in result
    logged.clear()  # MAE's fine-tuning with mean pooling: a tiny new head, a fresh fc_norm
    cfg = apply_overrides(RunConfig(task="finetune", init=pre.out, out=str(tmp_path / "ftm")),
                          [*FAST, "model.pool=mean", "train.base_lr=0", "train.min_lr=0"])
    engine.train(cfg)
    assert any("class head drawn with std 2e-05" in x and "fc_norm" in x for x in logged)
    state = load_file(str(latest(tmp_path / "ftm") / "model.safetensors"))
    assert torch.equal(state["vit.norm.weight"], torch.ones_like(state["vit.norm.weight"]))
    assert torch.equal(state["vit.norm.bias"], torch.zeros_like(state["vit.norm.bias"]))
    assert 0 < float(state["vit.head.weight"].std()) < 4e-5 and not state["vit.head.bias"].any()
    assert not torch.equal(encoder_before["mae.encoder.norm.weight"], state["vit.norm.weight"])


def test_video_pretraining_with_tube_masking(tmp_path):
    overrides = ["data.name=moving-digits", "data.frames=4", "data.num_clips=64", "data.label=direction",
                 "model.frames=4", "model.tubelet=2", "mae.masking=tube", "mae.mask_ratio=0.9",
                 "mae.decoder_width=32", "mae.decoder_depth=1", "mae.decoder_heads=2", "train.max_steps=2"]
    _, result = run(tmp_path, "vmae", *overrides, task="mae")
    assert math.isfinite(result["val_loss"])


def test_init_with_other_shapes_lists_the_keys(tmp_path):
    pre, _ = run(tmp_path, "src", "train.max_steps=1")
    with pytest.raises(ValueError, match="wrong shape: .*blocks"):
        run(tmp_path, "dst", "model.width=96", "model.heads=3", task="finetune", init=pre.out)
    with pytest.raises(ValueError, match="not found"):
        run(tmp_path, "dst2", task="finetune", init=str(tmp_path / "nothing"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, logged):
    real = tasks.Classifier.forward
    calls = {"n": 0}

    def flaky(self, x, y):
        calls["n"] += 1
        loss = real(self, x, y)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(tasks.Classifier, "forward", flaky)
    with pytest.raises(engine.StopTraining, match="step 3.*ckpt-00000002.*lower --train.base_lr"):
        run(tmp_path, "nan", "train.ckpt_every=2")
    monkeypatch.setattr(tasks.Classifier, "forward", real)
    logged.clear()  # the advice works: the same run, a lower LR, resumes from the last good checkpoint
    lower = [*FAST, "train.ckpt_every=2", "train.base_lr=1e-4"]
    cfg = apply_overrides(RunConfig(out=str(tmp_path / "nan")), lower)
    engine.train(cfg)
    assert any("changed recipe: train.base_lr" in x for x in logged)
    assert any("resum" in x and "ckpt-00000002" in x for x in logged)
    assert apply_overrides(RunConfig(), []).train.base_lr != 1e-4
    assert "0.0001" in (tmp_path / "nan" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="another config.*train.epochs"):
        run(tmp_path, "nan", "train.ckpt_every=2", "train.base_lr=1e-4", "train.epochs=7")


def test_bad_batch_and_run_dir_are_clear(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        run(tmp_path, "b", "train.batch=30", "train.accum=4")
    with pytest.raises(ValueError, match="larger than the training set"):
        run(tmp_path, "c", "train.batch=4096")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write"):
        run(tmp_path, "file/run")


def test_param_groups_decay_and_layer_scales():
    module = tasks.Classifier(RunConfig().model)
    groups = optim.param_groups(module, 0.05, layer_decay=0.5, depth=4)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert by_param[id(named["vit.norm.weight"])]["weight_decay"] == 0
    assert by_param[id(named["vit.pos_embed"])]["weight_decay"] == 0
    assert by_param[id(named["vit.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["vit.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** 5
    assert by_param[id(named["vit.blocks.3.mlp.0.weight"])]["lr_scale"] == 0.5 ** 1
    assert by_param[id(named["vit.head.weight"])]["lr_scale"] == 1.0


def test_lr_schedule_warms_up_then_follows_a_cosine():
    lrs = [optim.lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_compiled_model_trains(tmp_path):
    cfg, result = run(tmp_path, "compiled", "train.compile=true", "train.max_steps=2")
    eager, _ = run(tmp_path, "eager", "train.max_steps=2")
    assert losses(cfg) == pytest.approx(losses(eager), rel=1e-4)
