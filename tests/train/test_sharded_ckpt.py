"""Sharded checkpoints (train.sharded_ckpt: torch.distributed.checkpoint, each rank its own
shards): read back whole in one process, damaged ones passed over, and a run resumed on another
number of ranks than wrote its checkpoint continuing the same run."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import ranks
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from vitscale import weights
from vitscale.cli import main
from vitscale.common import checkpoint, dist, records
from vitscale.common.errors import UserError
from vitscale.runs.evaluate import evaluate_run
from vitscale.train.config import TrainConfig

ARGS = ["--train.batch=32", "--train.max_steps=6", "--train.threads=1", "--data.image_size=16",
            "--model.patch_size=4", "--train.warmup_epochs=0", "--train.label_smoothing=0",
            "--train.keep_steps=3"]
SHARDED = ["--train.fsdp=true", "--train.sharded_ckpt=true"]
# Not bitwise: 2 ranks reduce the gradient as the mean of two half-batch means, one process as one
# mean, so the sums run in another order (float32 rounding), and AdamW's division by sqrt(v)
# carries such differences into the weights. After 6 steps at lr 5e-4 they stay near 3e-6 here
# (a step moves a weight by up to ~5e-4): 1e-5 is far below one step and far above rounding.
ATOL = 1e-5


def tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    return model, opt


def save_tiny(run_dir: Path, step: int, seed=0):
    model, opt = tiny(seed)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))
    return model, opt, checkpoint.save_sharded(run_dir, step, msd, osd, {"step": step, "best": None},
                                               dist.Dist(), keep_last=5)


def test_a_sharded_checkpoint_reads_back_whole_and_restores_the_optimizer(tmp_path):
    model, opt, ckpt = save_tiny(tmp_path, 3)
    assert checkpoint.is_checkpoint(ckpt) and checkpoint.is_sharded(ckpt)
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "shards" / ".metadata").is_file()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    found = checkpoint.newest_good(tmp_path, shapes)
    weights_, optim_, state = found.model, found.optim, found.state
    assert found.path == ckpt and state["step"] == 3 and found.sharded and checkpoint.world_of(state) == 1
    assert weights_.keys() == model.state_dict().keys()
    assert all(torch.equal(weights_[k], v) for k, v in model.state_dict().items())
    fresh, fresh_opt = tiny(seed=1)  # other weights and moments, filled in place from the shards
    msd, osd = get_state_dict(fresh, fresh_opt, options=StateDictOptions(full_state_dict=False))
    msd, osd = checkpoint.load_shards(ckpt, msd, osd, optim_, no_dist=True)
    want = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))[1]
    assert osd["param_groups"] == json.loads(json.dumps(want["param_groups"]))
    assert {(p, n) for p in want["state"] for n in want["state"][p]} == {
        (p, n) for p in osd["state"] for n in osd["state"][p]}
    assert all(torch.equal(osd["state"][p][n], v) for p in want["state"] for n, v in want["state"][p].items())
    assert all(torch.equal(msd[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage,said", [
    ("metadata", ".metadata is missing"),
    ("garbled", ".metadata cannot be read"),
    ("shard", "is cut short"),
    ("state", "state.json cannot be read"),
])
def test_a_damaged_sharded_checkpoint_is_passed_over(tmp_path, damage, said, logged):
    save_tiny(tmp_path, 1)
    _, _, newest = save_tiny(tmp_path, 2, seed=1)
    shards = newest / "shards"
    if damage == "metadata":
        (shards / ".metadata").unlink()
    elif damage == "garbled":
        (shards / ".metadata").write_bytes((shards / ".metadata").read_bytes()[:40])
    elif damage == "shard":
        part = next(shards.glob("*.distcp"))
        part.write_bytes(part.read_bytes()[:100])
    else:
        (newest / "state.json").write_text('{"step": 2, "be')
    (tmp_path / "ckpt-00000003.tmp" / "shards").mkdir(parents=True)  # a save cut short: never read
    found = checkpoint.newest_good(tmp_path).path
    assert found == checkpoint.at(tmp_path, 1)
    assert len(logged) == 1 and said in logged[0] and str(newest) in logged[0], logged
    assert checkpoint.last_good(tmp_path) == checkpoint.at(tmp_path, 1)


def test_a_shard_of_bad_bytes_is_passed_over(tmp_path, logged):
    save_tiny(tmp_path, 1)
    _, _, newest = save_tiny(tmp_path, 2, seed=1)
    part = next((newest / "shards").glob("*.distcp"))
    part.write_bytes(bytes(len(part.read_bytes())))  # its length, zeros: only reading it tells
    assert checkpoint.last_good(tmp_path) == newest  # the metadata alone looks whole
    assert checkpoint.newest_good(tmp_path).path == checkpoint.at(tmp_path, 1)
    assert f"{newest / 'shards'} cannot be read" in logged[0], logged


def test_a_full_disk_while_sharding_is_the_os_error_and_leaves_the_older_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    save_tiny(tmp_path, 1)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(OSError) as e:  # what engine.train turns into its one line
        save_tiny(tmp_path, 2)
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001"]
    assert checkpoint.last_good(tmp_path) == checkpoint.at(tmp_path, 1)


def test_a_resume_whose_steps_another_rank_count_changes_is_one_line(tmp_path, capsys):
    """1,023 items in batches of 8: 127 steps an epoch on one process, 128 on two ranks (padded
    to 1,024); a checkpoint two ranks wrote does not go on here."""
    from safetensors.torch import save_file

    from vitscale.cli import main

    args = ["train", "--out", str(tmp_path), "--data.name=cluttered-digits", "--data.train_size=1023",
            "--data.val_size=64", "--data.test_size=0", "--data.image_size=16", "--model.patch_size=4",
            "--train.batch=8", "--train.max_steps=2", "--train.ckpt_every=1", "--train.threads=1"]
    assert main(args) == 0
    ckpt = checkpoint.at(tmp_path, 1)
    for later in [*tmp_path.glob("ckpt-0000000[2-9]"), tmp_path / "best", tmp_path / "final.json"]:
        shutil.rmtree(later) if later.is_dir() else later.unlink()
    state = json.loads((ckpt / "state.json").read_text())  # as if two ranks had written it
    state["rng"]["rank_rng"] = [dict(state["rng"])]
    (ckpt / "state.json").write_text(json.dumps(state))
    rng = load_file(str(ckpt / "rng.safetensors"))
    save_file(rng | {f"rank1/{k}": v.clone() for k, v in rng.items()}, str(ckpt / "rng.safetensors"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by 2 ranks" in err and "resume on 2 ranks" in err, err


def test_sharded_ckpt_needs_fsdp():
    with pytest.raises(UserError, match="train.sharded_ckpt needs train.fsdp=true") as e:
        TrainConfig(sharded_ckpt=True)
    assert "\n" not in str(e.value)
    assert TrainConfig(sharded_ckpt=True, fsdp=True).sharded_ckpt


def test_fsdp_on_one_process_says_how_to_go_on_there(tmp_path):
    """A sharded run resumed without torchrun: the line names both fields to turn off."""
    from vitscale.train import config, engine

    cfg = records.apply_overrides(config.recipe("train"), [a[2:] for a in [*ARGS, *SHARDED]])
    with pytest.raises(UserError, match=r"torchrun --nproc_per_node N, or on one process .*"
                                        r"--train.fsdp=false --train.sharded_ckpt=false") as e:
        engine.train(config.replace(cfg, out=str(tmp_path / "run")))
    assert "\n" not in str(e.value)


def two_ranks(*args: str, capsys=None) -> str:
    """`vitscale train` on 2 gloo ranks (rank 0 in this process): their output once both ended well."""
    return ranks.vitscale_here("train", *ARGS, *args, capsys=capsys)


def in_process(capsys, *args: str) -> str:
    """`vitscale train` on one process, run in the test's own (no torch to import again): its output."""
    capsys.readouterr()
    assert main(["train", *ARGS, *args]) == 0
    return capsys.readouterr().out


def cut_back(run_dir: Path, step: int) -> None:
    """Leave a run as a kill after its checkpoint of `step` would: later checkpoints, best/ and
    final.json gone (its metrics.jsonl rows past `step` are dropped by the resume)."""
    for ckpt in checkpoint.checkpoints(run_dir):
        if checkpoint.step_of(ckpt) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run_dir / "best")
    (run_dir / "final.json").unlink()


def full_state(ckpt: Path) -> tuple[dict, dict]:
    """(model, optimizer tensors) of a checkpoint, either kind, read whole."""
    if checkpoint.is_sharded(ckpt):
        return checkpoint.read_shards(ckpt), checkpoint.read_shards(ckpt, "optim/")
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optim.safetensors"))


def assert_close_states(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:  # optimizer moments on the scale of each tensor's largest
            torch.testing.assert_close(g[k], w[k], rtol=1e-3, atol=ATOL * max(1.0, w[k].abs().max().item()),
                                       msg=k)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The run on one process, never stopped (full checkpoints at steps 3 and 6): the reference."""
    run_dir = tmp_path_factory.mktemp("reference") / "one"
    assert main(["train", *ARGS, "--out", str(run_dir)]) == 0  # in this process: no torch to import again
    return run_dir


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The run on 2 gloo FSDP ranks writing sharded checkpoints (steps 3 and 6, best/)."""
    run_dir = tmp_path_factory.mktemp("sharded") / "two"
    two_ranks(*SHARDED, "--out", str(run_dir))
    return run_dir


@pytest.mark.slow
def test_eval_and_init_read_a_two_rank_sharded_run_in_one_process(sharded, one):
    assert checkpoint.is_sharded(sharded / "best") and checkpoint.is_sharded(checkpoint.latest(sharded))
    final = json.loads((sharded / "final.json").read_text())  # the 2 ranks' own evaluation of them
    got = evaluate_run(str(sharded))  # vitscale eval: best/ read whole from both ranks' shards
    assert got["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert got["val_top1"] == final["val_top1"]
    init = weights.read(sharded)  # --init RUN: the same weights, close to the one-process run's
    want = load_file(str(checkpoint.latest(one) / "model.safetensors"))
    assert {f"vit.{k}" for k in init.state} == want.keys()
    for k, v in init.state.items():
        torch.testing.assert_close(v, want[f"vit.{k}"], rtol=1e-4, atol=ATOL)


@pytest.mark.slow
def test_a_two_rank_sharded_run_resumes_on_one_process(sharded, one, tmp_path, capsys):
    """Stopped after step 3 and resumed on one process (train.fsdp off), the 2-rank sharded run
    ends close to the run that was one process throughout."""
    two = tmp_path / "two"
    shutil.copytree(sharded, two)
    cut_back(two, 3)
    out = in_process(capsys, "--out", str(two))  # one process: fsdp and sharded_ckpt off
    assert f"resumed from {checkpoint.at(two, 3)} at step 3" in out, out
    assert "resuming on 1 rank(s) a checkpoint 2 rank(s) wrote" in out, out
    assert not checkpoint.is_sharded(checkpoint.latest(two))
    assert_close_states(full_state(checkpoint.latest(two)), full_state(checkpoint.latest(one)))
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_a_two_rank_ddp_run_resumes_on_one_process(one, tmp_path, capsys):
    """Full checkpoints (DDP, gathered on rank 0) resume on another number of ranks too."""
    two = tmp_path / "two"
    two_ranks("--out", str(two))
    cut_back(two, 3)
    out = in_process(capsys, "--out", str(two))
    assert "resuming on 1 rank(s) a checkpoint 2 rank(s) wrote" in out, out
    assert_close_states(full_state(checkpoint.latest(two)), full_state(checkpoint.latest(one)))
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two_sharded_fsdp_ranks(one, tmp_path, capsys):
    """A one-process run stopped after step 3 and resumed on 2 gloo FSDP ranks writing sharded
    checkpoints ends close to the same run never stopped."""
    whole, moved = one, tmp_path / "moved"
    shutil.copytree(whole, moved)
    cut_back(moved, 3)
    out = two_ranks(*SHARDED, "--out", str(moved), capsys=capsys)
    assert f"resumed from {checkpoint.at(moved, 3)} at step 3" in out, out
    assert "resuming on 2 rank(s) a checkpoint 1 rank(s) wrote" in out and "ranks 1-1 seed" in out, out
    assert checkpoint.is_sharded(checkpoint.latest(moved))
    assert_close_states(full_state(checkpoint.latest(moved)), full_state(checkpoint.latest(whole)))
    assert losses(moved) == pytest.approx(losses(whole), rel=1e-4, abs=1e-5)
