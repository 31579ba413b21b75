"""One training loader for a whole run (issue 13): RunBatches gives, epoch after epoch, exactly the
batches a new per-epoch loader (an EpochSampler cut to the plan's step sizes) gave, its keys one
epoch at a time; the engine makes the loader once and stops its workers when the run ends or stops."""

import multiprocessing
import os
import signal

import pytest
import torch

from vitscale.common import records
from vitscale.common.errors import Interrupted
from vitscale.data import DataConfig, RunBatches, build_datasets, make_loader, sampler
from vitscale.data.sampler import EpochSampler
from vitscale.train import config, engine
from vitscale.train.config import TrainConfig
from vitscale.train.steps import Plan


def per_epoch(dataset, plan, seed, step, micro, accum, rank, world, repeats, workers):
    """The batches of the loaders a run made each epoch before (a new one an epoch)."""
    while step < plan.total:
        end = min(plan.total, plan.epoch_end(step))
        keys = EpochSampler(len(dataset), seed, plan.epoch(step), rank=rank, world=world,
                            start=plan.offset(step), repeats=repeats)
        yield from make_loader(dataset, keys, micro, workers, sizes=plan.batches(step, end, micro, accum))
        step = end


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits", image_size=8, val_fraction=0.7))[0]  # 360 items


# (multigrid cycles, the plan's frames, side, tubelet, repeated_aug, rank / world, accum, resume step)
CASES = [((), (1, 8, 1), 1, (0, 1), 1, 0),
         ((), (1, 8, 1), 3, (1, 2), 2, 5),  # repeated augmentation on rank 1 of 2, resumed mid-epoch
         (("long", "short"), (8, 32, 2), 1, (0, 1), 1, 7)]  # multigrid steps of several sizes, resumed


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cycles,data,repeats,ranks,accum,start", CASES)
def test_a_run_long_loader_gives_the_per_epoch_loaders_batches_bit_for_bit(
        digits, workers, cycles, data, repeats, ranks, accum, start):
    rank, world = ranks
    micro, per_rank = 16, len(EpochSampler(len(digits), 0, rank=rank, world=world))
    plan = Plan(TrainConfig(epochs=4, batch=micro * accum * world, multigrid=cycles), *data, 4, per_rank,
                micro * accum)
    assert plan.total > plan.epoch_end(start) > start  # the resume lands mid-epoch; more epochs follow
    keys = RunBatches(plan, len(digits), 3, start, plan.total, micro, accum, rank=rank, world=world,
                      repeats=repeats)
    want = list(per_epoch(digits, plan, 3, start, micro, accum, rank, world, repeats, workers))
    got = list(make_loader(digits, keys, micro, workers))
    assert len(got) == len(want) == len(keys) == (plan.total - start) * accum
    sizes = [micro * plan.shapes[s].mult for s in range(start, plan.total) for _ in range(accum)]
    assert [len(b["y"]) for b in got] == sizes and (len(set(sizes)) > 1) == bool(cycles)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in ("x", "y", "index"))
    # each epoch reads its own sampler's keys in order, from the resume offset in the first
    read, step = [k for b in keys for k in b], start
    while step < plan.total:
        end = min(plan.total, plan.epoch_end(step))
        n = sum(plan.batches(step, end, micro, accum))
        epoch = list(EpochSampler(len(digits), 3, plan.epoch(step), rank=rank, world=world, repeats=repeats))
        assert read[:n] == epoch[plan.offset(step) : plan.offset(step) + n]
        read, step = read[n:], end
    assert not read


def test_run_batches_hold_one_epochs_keys_at_a_time(monkeypatch):
    plan = Plan(TrainConfig(epochs=1000, batch=10), 1, 8, 1, 4, 100, 10)
    made = []
    real = sampler.EpochSampler.keys
    monkeypatch.setattr(sampler.EpochSampler, "keys", lambda self: made.append(self.epoch) or real(self))
    batches = iter(RunBatches(plan, 100, 0, 25, plan.total, 10))
    first = [next(batches) for _ in range(8)]  # steps 25..32: the end of epoch 2, the start of epoch 3
    assert made == [2, 3] and [len(b) for b in first] == [10] * 8


def _fast(tmp_path, name, *overrides):
    run = config.with_preset(config.RunConfig(out=str(tmp_path / name)), "pico/4")
    return records.apply_overrides(run, [
        "data.name=cluttered-digits", "data.train_size=48", "data.val_size=16", "data.test_size=16",
        "data.image_size=16", "train.batch=16", "train.epochs=3", "train.threads=1", "train.knn_k=0",
        "train.warmup_epochs=0", "data.workers=2", *overrides])  # 3 epochs of 3 steps


def _stop_at(monkeypatch, step: int):
    """SIGTERM in the middle of step `step` + 1 (the run stops when it ends)."""
    real = engine.Job.train_step

    def train_step(self, *args):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args)

    monkeypatch.setattr(engine.Job, "train_step", train_step)


@pytest.mark.slow
def test_a_run_makes_one_loader_and_leaves_no_worker_behind(tmp_path, monkeypatch):
    made = []
    real = engine.make_loader
    monkeypatch.setattr(engine, "make_loader", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    engine.train(_fast(tmp_path, "run"))
    assert len(made) == 1 and (made[0].step, made[0].end) == (0, 9)  # 3 epochs, one loader
    assert not multiprocessing.active_children()


def test_a_stopped_run_leaves_no_worker_behind(tmp_path, monkeypatch):
    _stop_at(monkeypatch, 1)  # mid-epoch 1: the loader's workers are fetching ahead
    with pytest.raises(Interrupted, match="at step 2 of 9") as stopped:
        engine.train(_fast(tmp_path, "cut"))
    assert stopped.traceback and not multiprocessing.active_children()  # the traceback holds the run's frames


@pytest.mark.slow
def test_a_run_stopped_with_workers_resumes_to_an_uninterrupted_ones_weights(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _stop_at(m, 4)  # mid-epoch 2, after an evaluation
        with pytest.raises(Interrupted, match="at step 5 of 9"):
            engine.train(_fast(tmp_path, "cut"))
    engine.train(_fast(tmp_path, "cut"))
    engine.train(_fast(tmp_path, "whole", "data.workers=0"))
    a, b = (engine.checkpoint.load(engine.checkpoint.latest(tmp_path / r)).model for r in ("cut", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
