"""Multigrid training (train.multigrid, Wu et al. 2020; issue 12) and the plan of steps it varies:
shapes of about a base step's compute, every epoch reading exactly a plain epoch's keys once each,
the LR scaled by the long cycle's batch, each step fed its shape, and a bitwise resume."""

import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file

from vitscale.common import records
from vitscale.common.checkpoint import at
from vitscale.common.errors import UserError
from vitscale.data import build_datasets, make_loader
from vitscale.data.sampler import EpochSampler
from vitscale.models.vit import PatchEmbed
from vitscale.train import config, engine, optim
from vitscale.train.config import TrainConfig
from vitscale.train.steps import Plan, multigrid_stages, reshape

CYCLES = [(), ("long",), ("short",), ("long", "short")]
FAST = ["data.name=moving-digits", "data.frames=4", "data.image_size=16", "data.num_clips=150",
        "train.batch=4", "train.epochs=2", "train.threads=1", "train.knn_k=0",
        "train.warmup_epochs=0.5", "train.keep_last=100", "train.ckpt_every=1", "train.multigrid=long,short"]


def train(out, *overrides):
    run = config.with_preset(config.RunConfig(out=str(out)), "pico/4-f4")
    cfg = records.apply_overrides(run, FAST + list(overrides))
    return cfg, engine.train(cfg).metrics


def test_each_shape_costs_about_a_base_step_and_the_last_stage_is_the_datas_shape():
    stages = multigrid_stages(("long", "short"), frames=8, side=32, tubelet=2, patch=4)
    for stage in stages:
        for s in stage:  # whole tubelets and patches; samples x frames x side^2 about constant
            assert s.frames % 2 == 0 and s.side % 4 == 0
            assert s.mult == max(1, round(8 * 32**2 / (s.frames * s.side**2)))
        assert len({s.lr_mult for s in stage}) == 1 and stage[-1].lr_mult == stage[-1].mult  # the stage's own
    # long cycle (T/4, S/√2), (T/2, S/√2), (T/2, S), (T, S); short cycle S/2, S/√2 then the stage's
    assert [(st[-1].frames, st[-1].side) for st in stages] == [(2, 24), (4, 24), (4, 32), (8, 32), (8, 32)]
    assert [s.side for s in stages[0]] == [16, 24, 24] and len(stages[-1]) == 1
    assert [s.mult for s in stages[3]] == [4, 2, 1]
    images = multigrid_stages(("long",), frames=1, side=32, tubelet=1, patch=4)
    assert {s.frames for st in images for s in st} == {1} and [st[0].mult for st in images] == [2, 2, 1, 1, 1]


@pytest.mark.parametrize("cycles", CYCLES)
@pytest.mark.parametrize("per_rank,per_step", [(1440, 32), (1003, 24), (75, 4)])
def test_every_epoch_reads_exactly_a_plain_epochs_keys_once_each(cycles, per_rank, per_step):
    t = TrainConfig(epochs=5, batch=per_step, multigrid=cycles)
    plain = TrainConfig(epochs=5, batch=per_step)
    plan, plain = (Plan(c, 8, 32, 2, 4, per_rank, per_step) for c in (t, plain))
    fake = types.SimpleNamespace(item_shape=(1,))
    for epoch in range(5):
        start, end = plan.starts[epoch], plan.starts[epoch + 1]
        keys = EpochSampler(per_rank, 0, epoch)
        loader = make_loader(fake, keys, 0, sizes=plan.batches(start, end, per_step, 1))
        read = [k for b in loader.batch_sampler for k in b]
        want = list(keys)[: (per_rank // per_step) * per_step]  # the plain epoch's keys, in its order
        assert read == want and len({i for i, _ in read}) == len(read)
        assert plain.starts[epoch + 1] - plain.starts[epoch] == per_rank // per_step
        for step in range(start, end):  # resuming at any step reads the rest of the epoch
            rest = list(EpochSampler(per_rank, 0, epoch, start=plan.offset(step)))
            assert rest[: len(want) - plan.offset(step)] == want[plan.offset(step):]
    assert plan.total < plain.total or not cycles


def test_a_plain_plan_is_the_old_arithmetic():
    t = TrainConfig(epochs=7, batch=32, warmup_epochs=1.3, max_steps=200)
    plan, spe = Plan(t, 1, 32, 1, 4, 1000, 32), 1000 // 32
    assert plan.total == min(200, 7 * spe) and plan.warmup() == round(1.3 * spe)
    assert all(plan.epochs_done(s) == s / spe for s in range(1, plan.total + 1))
    ends = [s for s in range(1, plan.total + 1) if plan.ends_epoch(s)]
    assert ends == [spe * e for e in range(1, 7)] + [200]
    assert {(s.mult, s.frames, s.side, s.lr_mult) for s in plan.shapes} == {(1, 1, 32, 1.0)}


def test_long_stages_take_about_equal_steps_and_the_coarse_ones_most_epochs():
    plan = Plan(TrainConfig(epochs=60, batch=8, multigrid=("long",)), 8, 32, 2, 4, 2000, 8)
    steps = [sum(1 for s in plan.shapes if (s.frames, s.side) == (st[0].frames, st[0].side))
             for st in plan.stages[:3]]
    assert max(steps) / min(steps) < 1.1  # equal compute per stage (the last two share a shape)
    shares = plan.shares()
    assert abs(sum(shares.values()) - 1) < 1e-9 and shares[(2, 24)] > 0.4


def test_reshape_keeps_evenly_spaced_frames_and_resizes_sides():
    x = torch.rand(2, 3, 8, 16, 16)
    assert reshape(x, 8, 16) is x
    assert torch.equal(reshape(x, 4, 16), x[:, :, [0, 2, 4, 6]])
    assert torch.equal(reshape(x, 2, 16), x[:, :, [0, 4]])
    assert reshape(x, 2, 8).shape == (2, 3, 2, 8, 8)
    assert reshape(torch.rand(2, 3, 16, 16), 1, 12).shape == (2, 3, 12, 12)


def test_a_multigrid_run_feeds_each_step_its_shape_at_its_lr(tmp_path, monkeypatch):
    seen, forward = [], PatchEmbed.forward

    def spied(self, x):
        seen.append((x.shape[0], x.shape[2], x.shape[-1]))  # samples, frames, side
        return forward(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", spied)
    cfg, result = train(tmp_path / "r", "train.ckpt_every=0")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    t = cfg.train
    n = len(build_datasets(cfg.data)[0])
    job_plan = Plan(t, 4, 16, 2, 4, n, 4)
    assert len(train_rows) == job_plan.total and job_plan.total < 2 * (n // 4)
    steps = [(4 * s.mult, s.frames, s.side) for s in job_plan.shapes]
    assert seen[: job_plan.starts[1]] == steps[: job_plan.starts[1]]  # then epoch 1's evaluation
    assert {(2, 8), (2, 12), (4, 16)} <= {(s[1], s[2]) for s in steps}  # coarse to the data's shape
    for r in train_rows:
        s = r["step"] - 1
        peak = t.base_lr * t.batch / 256 * job_plan.shapes[s].lr_mult  # the peak scales, the floor stays
        want = optim.lr_at(s, job_plan.total, job_plan.warmup(), peak, t.min_lr)
        assert r["lr"] == pytest.approx(want, rel=1e-12)
    assert {r["epoch"] for r in rows if r["split"] == "val"} == {1.0, 2.0} and 0 <= result["test_top1"] <= 1


def test_a_multigrid_run_killed_mid_epoch_resumes_bitwise(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(whole)
    last = json.loads((whole / "final.json").read_text())["step"]
    shutil.copytree(whole, killed)
    for path in killed.iterdir():  # killed two steps into the first epoch
        late = path.name.startswith("ckpt-") and int(path.name.split("-")[1]) > 2
        if late or path.name in ("best", "final.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(killed)
    a, b = (load_file(str(at(run, last) / "model.safetensors")) for run in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,message", [
    (["train.multigrid=medium"], "train.multigrid must be long, short or long,short"),
    (["train.multigrid=long,long"], "train.multigrid must be"),
    (["train.multigrid=long", "train.resolutions=16,24"], "use one of them"),
    (["task=mae", "train.multigrid=short"], "train.multigrid is for task supervised or finetune"),
])
def test_bad_multigrid_is_one_line_naming_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        records.apply_overrides(config.RunConfig(), ["model.patch_size=4", *overrides])
