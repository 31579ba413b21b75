"""Warmup-stable-decay: the LR schedule, kept checkpoints, and cooldown branches that end
bit for bit where a plain wsd run of their length ends."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vitscale.common import checkpoint
from vitscale.common.records import apply_overrides
from vitscale.train import engine, optim
from vitscale.train.config import RunConfig

# 1,438 training digits (no test split) at batch 128: 11 steps an epoch. Drop path and mixup make
# every step draw from the RNG, so a branch that restored it wrongly would drift.
TINY = ["data.image_size=8", "train.batch=128", "train.threads=1", "train.warmup_epochs=0.5",
        "train.schedule=wsd", "model.drop_path=0.1", "train.mixup=0.2", "train.knn_k=0",
        "data.test_fraction=0"]
STEPS_PER_EPOCH = 11


def run(tmp_path, name, *overrides):
    cfg = apply_overrides(RunConfig(out=str(tmp_path / name)), TINY + list(overrides))
    return engine.train(cfg).metrics


def final_weights(run_dir):
    return load_file(str(checkpoint.latest(run_dir) / "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def wsd_reference(step, total, warmup, peak, floor, decay_frac):
    """The schedule written out directly: warm-up, stable, then 1 - sqrt down to floor."""
    decay = round(decay_frac * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < total - decay:
        return peak
    return floor + (peak - floor) * (1 - math.sqrt((step - (total - decay) + 1) / decay))


def test_wsd_warms_up_holds_then_decays_as_one_minus_sqrt():
    total, warmup, peak, floor = 100, 10, 2.0, 0.1
    lrs = [optim.lr_at(s, total, warmup, peak, floor, "wsd", 0.2) for s in range(total)]
    assert lrs == [wsd_reference(s, total, warmup, peak, floor, 0.2) for s in range(total)]
    assert lrs[:10] == [peak * (s + 1) / 10 for s in range(10)]
    assert optim.decay_start(total, 0.2) == 80
    assert all(lr == peak for lr in lrs[10:80])  # exactly peak, not approximately
    assert peak - 0.5 < lrs[80] < peak  # the first decay step is just below peak
    assert lrs[89] == pytest.approx(floor + (peak - floor) * (1 - math.sqrt(0.5)))  # half-way
    assert lrs[-1] == floor
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:], strict=False))
    stable = [optim.lr_at(s, total, warmup, peak, floor, "wsd", 0.0) for s in range(total)]
    assert stable[10:] == [peak] * 90  # decay_frac 0: never decays


def test_wsd_before_the_decay_does_not_depend_on_the_run_length():
    for total in (7, 20, 25, 28, 101):
        start = optim.decay_start(total, 0.2)
        assert [optim.lr_at(s, total, 3, 1.0, 0.0, "wsd", 0.2) for s in range(start)] == [
            optim.lr_at(s, 1000, 3, 1.0, 0.0, "wsd", 0.0) for s in range(start)]
    assert [optim.decay_start(n, 0.2) for n in (25, 28, 1, 0)] == [20, 22, 1, 0]


@pytest.mark.parametrize(("total", "warmup", "peak", "floor"), [(100, 10, 1.0, 0.0), (37, 0, 4e-3, 1e-6),
                                                                (5, 5, 0.5, 0.01), (1000, 3, 3e-4, 0.0)])
def test_cosine_is_unchanged(total, warmup, peak, floor):
    def before(step):  # lr_at as it was before wsd
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    assert [optim.lr_at(s, total, warmup, peak, floor) for s in range(total + 2)] == [
        before(s) for s in range(total + 2)]


@pytest.mark.parametrize(("override", "message"), [
    ("train.schedule=linear", "train.schedule must be one of cosine, wsd, got 'linear'"),
    ("train.decay_frac=1.5", r"train.decay_frac must be in \[0, 1\]"),
    ("train.keep_steps=0,4", "keep_steps must be optimizer steps of 1 or more"),
])
def test_bad_schedule_settings_fail_with_one_line(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(RunConfig(), [override])


def test_pruning_never_deletes_a_kept_step(tmp_path):
    weights = {"w": torch.zeros(2)}
    empty = {"state": {}, "param_groups": []}
    for step in range(1, 9):
        checkpoint.save(tmp_path, step, weights, empty, {"step": step}, keep_last=2, keep_steps=(2, 5))
    assert [checkpoint.step_of(c) for c in checkpoint.checkpoints(tmp_path)] == [2, 5, 7, 8]
    assert checkpoint.at(tmp_path, 5).name == "ckpt-00000005"


@pytest.mark.slow
def test_cooldown_branches_end_bitwise_equal_to_plain_wsd_runs(tmp_path):
    """One stable run to 28 steps; branches of 25 steps (from step 20, mid-epoch, crossing the
    epoch end at 22) and 28 steps (from step 22, an epoch end) against runs from scratch."""
    lengths = (25, 28)
    starts = [optim.decay_start(n, 0.2) for n in lengths]
    assert starts == [20, 22] and starts[0] % STEPS_PER_EPOCH and not starts[1] % STEPS_PER_EPOCH
    run(tmp_path, "stable", "train.decay_frac=0", "train.max_steps=28", "train.keep_last=1",
        f"train.keep_steps={','.join(map(str, starts))}")
    kept = [checkpoint.step_of(c) for c in checkpoint.checkpoints(tmp_path / "stable")]
    assert set(starts) <= set(kept)
    evaluated = [json.loads(x) for x in (tmp_path / "stable" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evaluated if r["split"] == "val"] == [11, 22, 28]  # STEPS_PER_EPOCH holds
    for n, start in zip(lengths, starts, strict=True):
        branch = run(tmp_path, f"branch{n}", f"train.max_steps={n}",
                     f"train.branch_from={checkpoint.at(tmp_path / 'stable', start)}")
        plain = run(tmp_path, f"plain{n}", f"train.max_steps={n}")
        assert_bitwise_equal(final_weights(tmp_path / f"branch{n}"), final_weights(tmp_path / f"plain{n}"))
        assert branch == plain  # the annealed evaluation, also in final.json
        final = json.loads((tmp_path / f"branch{n}" / "final.json").read_text())
        assert final["step"] == n and final["val_loss"] == plain["val_loss"]
        rows = [json.loads(x) for x in (tmp_path / f"branch{n}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(start + 1, n + 1))


def test_bad_branches_fail_with_one_line(tmp_path):
    run(tmp_path, "stable", "train.decay_frac=0", "train.max_steps=10", "train.keep_steps=8")
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        run(tmp_path, "b1", "train.max_steps=12", f"train.branch_from={tmp_path / 'stable' / 'ckpt-4'}")
    kept = checkpoint.at(tmp_path / "stable", 8)
    with pytest.raises(ValueError, match="must keep its parent's config, but train.seed is 0 there, 1 here"):
        run(tmp_path, "b2", "train.max_steps=12", "train.seed=1", f"train.branch_from={kept}")
    # 6 warm-up steps; a 10-step run decaying over half of it decays from step 5, warm-up until 6
    with pytest.raises(ValueError, match="LR at step 6 .*decay start"):
        run(tmp_path, "b3", "train.max_steps=10", "train.decay_frac=0.5", f"train.branch_from={kept}")
    with pytest.raises(ValueError, match="at step 8, not before this run's last"):
        run(tmp_path, "b4", "train.max_steps=8", f"train.branch_from={kept}")


def test_lars_step_is_its_definition():
    """Two LARS steps on a matrix and a vector against the formulas (You et al. 2017; MAE's probe)."""
    from vitscale.train.optim import LARS

    torch.manual_seed(0)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    ref_w, ref_b = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.5,
               momentum=0.9, eta=0.01)
    mu_w, mu_b = torch.zeros_like(ref_w), torch.zeros_like(ref_b)
    for _ in range(2):
        gw, gb = torch.randn(3, 4), torch.randn(3)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw + 0.1 * ref_w
        u = u * (0.01 * ref_w.norm() / u.norm())  # the trust ratio: matrices only
        mu_w, mu_b = 0.9 * mu_w + u, 0.9 * mu_b + gb
        ref_w, ref_b = ref_w - 0.5 * mu_w, ref_b - 0.5 * mu_b
        assert torch.allclose(w, ref_w, atol=1e-6) and torch.allclose(b, ref_b, atol=1e-6)
