"""Distillation (issue 11): the losses against their definitions and torch's own KL, the teacher
frozen and in eval mode at its own input size, its forward counted in the training FLOPs, the
refusals, and runs through the engine and the CLI (resume exact, a feature run as --init)."""

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitscale import tasks, weights
from vitscale.cli import main
from vitscale.common.checkpoint import latest
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides
from vitscale.models.presets import preset
from vitscale.models.vit import ViT
from vitscale.tasks.distill import Distiller, FeatureDistiller, hard_distillation, soft_distillation
from vitscale.train import config, engine
from vitscale.train.config import DistillConfig, RunConfig
from vitscale.train.flops import train_flops_per_sample

STUDENT = preset("pico/4", image_size=8, num_classes=10)
FAST = ["train.batch=32", "train.max_steps=4", "train.ckpt_every=2", "train.threads=1", "train.knn_k=5",
        "data.image_size=8", "model.patch_size=4", "train.warmup_epochs=0"]


def saved(tmp_path, model, name="teacher"):
    """A model written as a vitscale weights directory (what --teacher reads)."""
    weights.export(model, tmp_path / name, "vitscale")
    return str(tmp_path / name)


def distill_cfg(teacher: str, **fields) -> RunConfig:
    return RunConfig(task="distill", model=STUDENT, distill=DistillConfig(teacher=teacher, **fields))


def test_soft_distillation_is_the_kl_at_temperature_times_its_square():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    p, q = (teacher / T).softmax(-1), (student / T).softmax(-1)
    by_hand = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(2)) / 2 * T**2
    torch_kl = F.kl_div((student / T).log_softmax(-1), p, reduction="batchmean") * T**2
    assert float(soft_distillation(student, teacher, T)) == pytest.approx(by_hand, rel=1e-6)
    assert float(soft_distillation(student, teacher, T)) == pytest.approx(float(torch_kl), rel=1e-6)
    assert float(soft_distillation(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-7)


def test_hard_distillation_is_cross_entropy_against_the_teachers_top_class():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 4.0, 1.0]])  # top classes 0 and 1
    by_hand = -(math.log(student[0].softmax(-1)[0]) + math.log(student[1].softmax(-1)[1])) / 2
    assert float(hard_distillation(student, teacher)) == pytest.approx(by_hand, rel=1e-6)


def test_a_teacher_identical_to_the_student_at_temperature_1_leaves_the_label_loss_times_1_minus_alpha():
    twin = ViT(STUDENT)
    module = Distiller(STUDENT, copy.deepcopy(twin), "soft", alpha=0.3, temperature=1.0)
    module.vit.load_state_dict(twin.state_dict())
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    module.train()
    ce = F.cross_entropy(twin(x), y)  # the known loss: no smoothing, no mixup
    assert float(module(x, y).detach()) == pytest.approx(0.7 * float(ce.detach()), rel=1e-5)
    hard = Distiller(STUDENT, copy.deepcopy(twin), "hard", alpha=0.3)
    hard.vit.load_state_dict(twin.state_dict())
    by_hand = 0.7 * ce + 0.3 * F.cross_entropy(twin(x), twin(x).argmax(-1))
    assert float(hard(x, y).detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)
    both = Distiller(STUDENT, copy.deepcopy(twin), "both", alpha=0.3)  # soft is 0 here: half of hard's
    both.vit.load_state_dict(twin.state_dict())
    by_hand = 0.7 * ce + 0.3 * F.cross_entropy(twin(x), twin(x).argmax(-1)) / 2
    assert float(both(x, y).detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)


def test_the_teacher_is_frozen_in_eval_mode_outside_the_state_and_at_its_own_input_size(tmp_path):
    big = ViT(preset("pico/4", image_size=16, num_classes=10, drop_path=0.5))  # drop-path: eval matters
    module = tasks.build(distill_cfg(saved(tmp_path, big)), 10)
    assert isinstance(module, Distiller) and module.teacher.cfg.image_size == 16
    assert not any(k.startswith("_teacher") or "teacher" in k for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.vit.parameters())
    module.train()
    assert module.vit.training and not module.teacher.training
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))  # the student's size; the teacher's is 16
    module(x, y).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.vit.parameters())
    resized = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.equal(module._teacher.logits(x), module.teacher(resized))
    ema = copy.deepcopy(module)  # an EMA copy shares the teacher, it does not hold a second
    assert ema.teacher is module.teacher and ema.vit is not module.vit


def test_the_student_starts_as_it_would_alone(tmp_path):
    """Loading the teacher draws nothing from the RNG: at one seed a distilled student and one
    trained alone start from the same weights (an equal comparison)."""
    path = saved(tmp_path, ViT(STUDENT))
    torch.manual_seed(3)
    alone = tasks.build(RunConfig(model=STUDENT), 10)
    torch.manual_seed(3)
    taught = tasks.build(distill_cfg(path), 10)
    a, b = alone.state_dict(), taught.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_training_flops_count_the_teachers_forward(tmp_path):
    big = preset("pico/4", image_size=16, num_classes=10, depth=6)
    path = saved(tmp_path, ViT(big))
    alone = train_flops_per_sample(RunConfig(model=STUDENT), 10)
    taught = train_flops_per_sample(distill_cfg(path), 10)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # as train_flops_per_sample counts (attention's products included)
        teacher, x = ViT(big).eval(), torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(x)
    assert taught == alone + counter.get_total_flops() / 2 / 2  # multiply-adds per sample
    assert taught > 2 * alone


def test_feature_distillation_matches_projected_tokens_to_the_teachers_normalised_tokens(tmp_path):
    wide = preset("pico/4", image_size=8, width=96, heads=3, num_classes=0)
    module = tasks.build(distill_cfg(saved(tmp_path, ViT(wide)), kind="feature"), 10)
    assert isinstance(module, FeatureDistiller) and module.head.weight.shape == (96, 64)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        predicted = module.head(module.vit.forward_features(x)[:, 1:])  # [3, 4, 96]
        target = module.teacher.forward_features(x, norm=False)[:, 1:]
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True)
                                                             + 1e-6).sqrt()
        diff = (predicted - target).abs()
        by_hand = torch.where(diff < 2.0, 0.5 * diff**2 / 2.0, diff - 1.0).mean()  # smooth-L1, beta 2
        assert float(module(x, None)) == pytest.approx(float(by_hand), rel=1e-5)
    assert set(module.state_dict()) == {f"vit.{k}" for k in module.vit.state_dict()} | {"head.weight",
                                                                                         "head.bias"}


@pytest.mark.parametrize(("teacher", "fields", "message"), [
    ("missing", {}, "not found"),
    (preset("pico/4", image_size=16, num_classes=0), {"kind": "feature"}, "token grid"),
    (preset("pico/4", image_size=8, num_classes=0), {}, "no class outputs"),
    (preset("pico/4", image_size=8, num_classes=7), {"kind": "hard"}, "7 class outputs"),
])
def test_a_teacher_that_cannot_teach_is_one_line(tmp_path, teacher, fields, message):
    path = str(tmp_path / "missing") if teacher == "missing" else saved(tmp_path, ViT(teacher))
    with pytest.raises(UserError, match=message) as e:
        tasks.build(distill_cfg(path, **fields), 10)
    assert "\n" not in str(e.value)


def test_the_config_is_checked():
    with pytest.raises(UserError, match="needs a teacher"):
        RunConfig(task="distill")
    for key, value, field in [("kind", "logits", "distill.kind"), ("alpha", "1.5", "distill.alpha"),
                              ("temperature", "0", "distill.temperature")]:
        with pytest.raises(UserError, match=field):
            apply_overrides(RunConfig(), [f"distill.{key}={value}"])
    assert config.recipe("distill", distill=DistillConfig(teacher="t")).task == "distill"


def test_the_cli_refuses_a_missing_teacher_in_one_line(tmp_path, capsys):
    for argv in (["distill", "--out", str(tmp_path / "a")],
                 ["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "b"), *FAST]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitscale: error:") and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_distilled_run_resumes_exactly_and_a_feature_run_starts_the_task_stage(tmp_path, capsys, logged):
    teacher = tmp_path / "teacher"
    assert main(["train", "--out", str(teacher), "--model", "mu/4", *[f"--{o}" for o in FAST]]) == 0
    run = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--out", str(run), "--distill.temperature=2",
            *[f"--{o}" for o in FAST]]
    assert main(argv) == 0
    end = load_file(str(run / "ckpt-00000004" / "model.safetensors"))
    assert all(k.startswith("vit.") for k in end)  # the student alone
    shutil.rmtree(run / "ckpt-00000004")  # as a kill after step 2's checkpoint leaves it
    (run / "final.json").unlink()
    assert main(argv) == 0
    again = load_file(str(run / "ckpt-00000004" / "model.safetensors"))
    assert all(torch.equal(again[k], end[k]) for k in end)  # bitwise the run never interrupted
    capsys.readouterr()

    mae = ["mae.decoder_width=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]
    pre = apply_overrides(RunConfig(task="mae", out=str(tmp_path / "mae")), FAST + mae)
    engine.train(pre)
    feature = apply_overrides(RunConfig(out=str(tmp_path / "feat")),
                              FAST + ["task=distill", f"distill.teacher={pre.out}", "distill.kind=feature"])
    result = engine.train(feature).metrics
    assert {"val_loss", "knn_top1"} <= set(result) and "val_top1" not in result
    logged.clear()
    tuned = apply_overrides(RunConfig(task="finetune", init=feature.out, out=str(tmp_path / "ft")), FAST)
    assert "val_top1" in engine.train(tuned).metrics
    student = load_file(str(latest(tmp_path / "feat") / "model.safetensors"))
    start = [x for x in logged if "encoder weights from" in x]
    assert start and "left out: head.weight (class head dropped)" in start[0], logged  # the projection
    assert not torch.equal(student["vit.blocks.0.attn.qkv.weight"],
                           ViT(STUDENT).state_dict()["blocks.0.attn.qkv.weight"])
    specific = ["distill", "--teacher", str(teacher), "--init", feature.out, "--out", str(tmp_path / "spec"),
                *[f"--{o}" for o in FAST]]  # G2SD's specific stage: logits, from the generic stage's student
    assert main(specific) == 0
    assert f"encoder weights from {feature.out}" in capsys.readouterr().out
