"""Multi-resolution training (train.resolutions, ResFormer; issue 12): the side of each step is a
pure function of (seed, step) covering every side, the position embedding at the trained grid is
the stored one bit for bit, a run resumes bitwise, and `eval --resolution` scores another side."""

import json
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitscale.cli import main
from vitscale.common import records
from vitscale.common.checkpoint import at
from vitscale.common.errors import UserError
from vitscale.data.multires import resize, side_at
from vitscale.models.vit import PatchEmbed, ViT, ViTConfig
from vitscale.runs.evaluate import evaluate_run
from vitscale.train import config, engine

FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "train.warmup_epochs=0", "train.knn_k=0", "train.keep_last=10", "train.ckpt_every=1",
        "train.resolutions=12,16,20"]


def train(out, *overrides):
    cfg = records.apply_overrides(config.RunConfig(out=str(out)), FAST + list(overrides))
    return cfg, engine.train(cfg).metrics


def spy_sides(monkeypatch) -> list[int]:
    """The side of every input the patch embedding sees, in order."""
    seen, forward = [], PatchEmbed.forward

    def spied(self, x):
        seen.append(x.shape[-1])
        return forward(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", spied)
    return seen


def test_the_side_of_a_step_is_a_pure_function_of_seed_and_step_and_covers_every_side():
    sides = (24, 32, 40)
    seq = [side_at(sides, 7, s) for s in range(300)]
    assert seq == [side_at(sides, 7, s) for s in range(300)]  # again, in any order of calls
    assert [side_at(sides, 7, s) for s in reversed(range(300))] == seq[::-1]
    for c in range(100):  # each cycle of len(sides) steps is a permutation: equal shares
        assert sorted(seq[3 * c: 3 * c + 3]) == sorted(sides)
    assert len({tuple(seq[3 * c: 3 * c + 3]) for c in range(100)}) == 6  # all 3! orders occur
    assert seq != [side_at(sides, 8, s) for s in range(300)]  # the seed matters
    assert Counter(side_at((16,), 3, s) for s in range(10)) == {16: 10}


def test_resize_is_the_identity_at_the_same_side_and_torchs_antialiased_bilinear_otherwise():
    x = torch.rand(2, 3, 16, 16)
    assert resize(x, 16) is x
    assert torch.equal(resize(x, 8), F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True))
    assert torch.equal(resize(x, 20), F.interpolate(x, size=(20, 20), mode="bilinear"))
    clip = torch.rand(2, 3, 4, 16, 16)  # [B, C, T, H, W]: each frame resized alike
    assert torch.equal(resize(clip, 12)[:, :, 2], resize(clip[:, :, 2], 12))


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_the_position_embedding_at_the_trained_grid_is_the_stored_one_bit_for_bit(pos):
    cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, heads=2, num_classes=10, pos_embed=pos)
    torch.manual_seed(0)
    vit = ViT(cfg)
    assert torch.equal(vit.pos_embed_for(cfg.grid), vit.pos_embed)
    # another grid: a fixed table is the one a ViT built at that size has (independent build)
    other = ViT(cfg.replace(image_size=24)).pos_embed
    if pos == "sincos":
        assert torch.equal(vit.pos_embed_for((1, 6, 6)), other)
    else:  # a learned table is resampled bicubically on its 4 x 4 grid
        table = vit.pos_embed[0, 1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
        want = F.interpolate(table, size=(6, 6), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 36, 32)
        assert torch.allclose(vit.pos_embed_for((1, 6, 6))[:, 1:], want, atol=1e-6)
    x = torch.rand(2, 3, 24, 24)
    assert vit(x).shape == (2, 10)  # any side that is a multiple of the patch


def test_a_multires_run_trains_each_step_at_its_drawn_side(tmp_path, monkeypatch):
    seen = spy_sides(monkeypatch)
    cfg, _ = train(tmp_path / "r", "train.ckpt_every=0")
    assert seen[:4] == [side_at((12, 16, 20), cfg.train.seed, s) for s in range(4)]  # then evaluation
    assert set(seen[:4]) == {12, 16, 20} and set(seen[4:]) == {16}  # (val and test at the data's side)


def test_a_multires_run_killed_mid_epoch_resumes_bitwise(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(whole)
    shutil.copytree(whole, killed)
    for gone in (at(killed, 3), at(killed, 4), killed / "best", killed / "final.json"):  # killed at step 2
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    train(killed)
    a, b = (load_file(str(at(run, 4) / "model.safetensors")) for run in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_at_another_resolution_feeds_the_data_at_that_side(tmp_path, monkeypatch, capsys):
    cfg, result = train(tmp_path / "r", "train.ckpt_every=0")
    same = evaluate_run(cfg.out, device="cpu", resolution=16)
    assert same == evaluate_run(cfg.out, device="cpu")  # the trained side: the plain evaluation
    seen, _ = spy_sides(monkeypatch), capsys.readouterr()
    assert main(["eval", cfg.out, "--device", "cpu", "--resolution", "24", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["val_top1"] <= 1 and set(seen) == {24}
    assert main(["eval", cfg.out, "--resolution", "18"]) == 2
    err = capsys.readouterr().err
    assert "--resolution 18 is not a multiple of the patch size 4" in err and err.count("\n") == 1


@pytest.mark.parametrize("overrides,message", [
    (["train.resolutions=24,24"], "distinct"),
    (["train.resolutions=0,24"], "distinct"),
    (["train.resolutions=24,30"], r"train.resolutions \[30\] are not multiples of the patch size 4"),
    (["task=mae", "train.resolutions=24,32"], "for task supervised or finetune"),
])
def test_bad_resolutions_are_one_line_naming_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        records.apply_overrides(config.RunConfig(), ["model.patch_size=4", *overrides])
    assert records.apply_overrides(config.RunConfig(), ["train.resolutions="]).train.resolutions == ()
