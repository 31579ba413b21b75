"""Test views (data.test_views): VideoMAE's evenly spaced clips x crops, and the per-item mean of
their softmax, checked against VideoMAE's own formulas written out here."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import av
import numpy as np
import pytest
import ranks
import torch
import torch.nn.functional as F
from torch import nn

from vitscale import tasks
from vitscale.cli import main
from vitscale.common import dist
from vitscale.common.errors import UserError
from vitscale.data import DataConfig
from vitscale.data.builtin import Digits, MovingDigits
from vitscale.data.common import KeyedDataset
from vitscale.data.folders import VideoFiles
from vitscale.data.generated import ClutteredDigits
from vitscale.data.transforms import ClipTransform, center_crop_box
from vitscale.data.video import clip_indices
from vitscale.data.views import View, Views, distinct, parse_views
from vitscale.tasks import classify, evaluate
from vitscale.train.config import RunConfig, TrainConfig


def videomae_clip(total: int, frames: int, stride: int, clip: int, clips: int) -> list[int]:
    """VideoMAE kinetics.py test mode: the video taken every `stride` frames, then `frames` of
    those from int(clip * step), step = max((L - frames) / (clips - 1), 0)."""
    taken = list(range(0, total, stride))
    while len(taken) < frames:
        taken.append(taken[-1])
    step = max(1.0 * (len(taken) - frames) / (clips - 1), 0)
    start = int(clip * step)
    return taken[start:start + frames]


@pytest.mark.parametrize("spec,want", [("1x1", (1, 1)), ("5x3", (5, 3)), ("2X3", (2, 3)), (" 4 x 1", (4, 1))])
def test_parse_views(spec, want):
    assert parse_views(spec) == want


@pytest.mark.parametrize("spec", ["5", "0x3", "3x0", "11x10", "ax3", "", "5x3x1", "-1x3"])
def test_bad_views_are_refused_naming_the_field(spec):
    with pytest.raises(UserError, match="data.test_views"):
        parse_views(spec)
    with pytest.raises(UserError, match="data.test_views"):
        DataConfig(test_views=spec)


GRIDS = [(300, 16, 4), (100, 8, 2), (40, 4, 2), (37, 8, 3), (17, 4, 1)]  # (total, frames, stride)


@pytest.mark.parametrize("total,frames,stride", GRIDS)
@pytest.mark.parametrize("clips", [2, 5])
def test_clip_starts_are_videomae_s_evenly_spaced_grid(total, frames, stride, clips):
    for c in range(clips):
        assert clip_indices(total, frames, stride, View(c, clips, 0, 1)) == videomae_clip(
            total, frames, stride, c, clips)
    starts = [clip_indices(total, frames, stride, View(c, clips, 0, 1))[0] for c in range(clips)]
    gaps = np.diff(starts) // stride
    assert starts[0] == 0 and gaps.max() - gaps.min() <= 1  # evenly spaced, from the first frame


def test_a_video_shorter_than_a_clip_gives_every_view_the_same_clip():
    clips = [clip_indices(10, 8, 2, View(c, 5, 0, 1)) for c in range(5)]
    assert all(c == clips[0] for c in clips) and clips[0][0] == 0


@pytest.mark.parametrize("total", [5, 64, 301])
def test_one_clip_is_the_centered_eval_clip(total):
    assert clip_indices(total, 8, 4, View(0, 1, 0, 1)) == clip_indices(total, 8, 4, None)


def test_crops_sit_left_center_right_along_the_longer_side():
    # VideoMAE: spatial_step = (long - short) / (crops - 1), crop j starts at int(j * step)
    assert [View(0, 1, j, 3).box(32, 48, 1.0) for j in range(3)] == [
        (0, 0, 32, 32), (0, 8, 32, 32), (0, 16, 32, 32)]
    assert [View(0, 1, j, 3).box(50, 30, 1.0) for j in range(3)] == [
        (0, 0, 30, 30), (10, 0, 30, 30), (20, 0, 30, 30)]
    # a crop share below 1: squares of that side, centered across the shorter side
    assert [View(0, 1, j, 2).box(40, 100, 0.5) for j in range(2)] == [(10, 0, 20, 20), (10, 80, 20, 20)]


@pytest.mark.parametrize("h,w,share", [(32, 48, 1.0), (48, 33, 0.875), (31, 31, 0.5), (7, 90, 0.875)])
def test_one_crop_is_the_eval_center_crop(h, w, share):
    assert View(0, 1, 0, 1).box(h, w, share) == center_crop_box(h, w, share)


def test_a_transform_takes_a_view_s_crop():
    x = torch.rand(3, 2, 24, 40)
    tf = ClipTransform(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    right = tf(x, View(0, 1, 2, 3))
    assert torch.equal(right, tf(x[..., 16:], None))  # the right square, taken whole
    assert torch.equal(tf(x, View(0, 1, 0, 1)), tf(x, None))


def write_video(path: Path, n: int, width: int = 48, height: int = 32) -> None:
    """Frame k is uniform gray 10 + 4k (decodes back to within ~1 level)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"qmin": "1", "qmax": "1"}
        for k in range(n):
            gray = np.full((height, width, 3), 10 + 4 * k, np.uint8)
            frame = av.VideoFrame.from_ndarray(gray, format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_ids(x: torch.Tensor) -> list[int]:
    """[C, T, H, W] in [0, 1] -> the source frame numbers write_video encoded."""
    return [round((m * 255 - 10) / 4) for m in x.mean((0, 2, 3)).tolist()]


def test_views_of_a_real_video_take_videomae_s_clips(tmp_path):
    write_video(tmp_path / "a.mp4", 40)
    tf = ClipTransform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    video = VideoFiles([(str(tmp_path / "a.mp4"), 1)], ("a", "b"), tf, False, frames=4, stride=2)
    views = Views(video, 5, 3)
    assert len(views) == 15 and distinct(video, 5, 3) == (5, 3)
    for k in range(15):
        item = views[k]
        assert item["index"] == k and item["y"] == 1 and item["x"].shape == (3, 4, 16, 16)
        assert frame_ids(item["x"]) == videomae_clip(40, 4, 2, k // 3, 5)
    assert torch.equal(Views(video, 1, 1)[0]["x"], video[0]["x"])  # 1x1: the eval item


@pytest.mark.parametrize("dataset", [MovingDigits, Digits, ClutteredDigits])
def test_built_in_data_has_one_distinct_view(dataset):
    assert distinct(dataset.__new__(dataset), 5, 3) == (1, 1)


def test_every_view_of_a_generated_clip_is_the_eval_item(logged):
    tf = ClipTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # built-ins: eval_crop 1
    clips = MovingDigits(3, 0, list(range(50)), 16, 4, "digit", 1, 0, tf)  # exactly 4 frames, square
    for c, j in [(0, 0), (2, 1), (4, 2)]:
        assert torch.equal(clips.load(1, View(c, 5, j, 3))["x"], clips[1]["x"])
    clips.item_shape = (3, 4, 16, 16)
    logits, _ = evaluate.view_scores(Linear(3 * 4 * 16 * 16, 10).predict, clips, (5, 3),
                                     RunConfig(train=TrainConfig(batch=4)), dist.Dist())
    assert logits.shape == (3, 10) and "only 1x1" in logged[0]  # one view scored, and the log says so


def test_merged_scores_are_the_log_of_the_mean_softmax_per_item():
    torch.manual_seed(0)
    logits = torch.randn(7, 4) * 3
    item = torch.tensor([2, 0, 2, 0, 2, 4, 0])  # items 1 and 3 have no view (unreadable): left out
    y = torch.tensor([1, 3, 1, 3, 1, 0, 3])
    order = torch.randperm(7)  # rows come gathered from ranks in any order
    merged, labels = evaluate.merge_views(logits[order], y[order], item[order], 5)
    p = logits.double().softmax(1)
    want = torch.stack([p[item == i].mean(0) for i in (0, 2, 4)]).log()
    torch.testing.assert_close(merged.double(), want, rtol=0, atol=1e-6)
    assert labels.tolist() == [3, 1, 0]


def test_merged_scores_do_not_underflow():
    logits = torch.tensor([[0.0, -200.0], [0.0, -300.0]])  # float32 softmax of class 1: 0
    merged, _ = evaluate.merge_views(logits, torch.tensor([1, 1]), torch.tensor([0, 0]), 1)
    want = torch.logsumexp(torch.tensor([-200.0, -300.0], dtype=torch.float64), 0) - np.log(2)
    assert torch.isfinite(merged).all() and abs(float(merged[0, 1]) - float(want)) < 1e-3


class Linear(nn.Module):
    """A fixed linear classifier of flattened inputs."""

    def __init__(self, inputs: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(inputs, classes)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def video_context(tmp_path, views=(1, 1)) -> tuple[Linear, evaluate.Context]:
    lengths = [40, 23, 61, 8, 33, 50]
    for i, n in enumerate(lengths):
        write_video(tmp_path / f"{i}.mp4", n)
    tf = ClipTransform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    samples = [(str(tmp_path / f"{i}.mp4"), i % 3) for i in range(len(lengths))]
    video = VideoFiles(samples, ("a", "b", "c"), tf, False, frames=2, stride=3)
    video.item_shape = (3, 2, 8, 8)
    torch.manual_seed(1)
    module = Linear(3 * 2 * 8 * 8, 3)
    cfg = RunConfig(train=TrainConfig(batch=4))
    return module, evaluate.Context(cfg, video, video, None, dist.Dist(), views=views)


def test_one_view_gives_the_single_view_metrics_exactly(tmp_path):
    module, ctx = video_context(tmp_path)
    logits, y = evaluate.outputs(module.predict, ctx.val_set, ctx.cfg, ctx.d)
    want = {"val_top1": evaluate.top_k(logits, y, 1), "val_loss": float(F.cross_entropy(logits, y))}
    assert classify.metrics(module, ctx) == want
    # merged over one view: the log-softmax, which ranks and scores as the logits
    merged, labels = evaluate.merge_views(logits, y, torch.arange(len(y)), len(y))
    assert torch.equal(labels, y) and torch.equal(merged.argmax(1), logits.argmax(1))
    assert abs(float(F.cross_entropy(merged, y)) - want["val_loss"]) < 1e-6


def test_views_score_each_item_by_its_views_mean_softmax(tmp_path):
    module, ctx = video_context(tmp_path, views=(2, 3))
    got = classify.metrics(module, ctx)
    video, correct, nll = ctx.val_set, 0, 0.0
    with torch.no_grad():
        for i in range(len(video)):
            xs = torch.stack([video.load(i, View(c, 2, j, 3))["x"] for c in range(2) for j in range(3)])
            p = module.predict(xs).double().softmax(1).mean(0)  # [K]
            correct += int(p.argmax()) == video.labels[i]
            nll -= float(p[video.labels[i]].log())
    assert got["val_top1"] == pytest.approx(correct / len(video), abs=1e-6)
    assert got["val_loss"] == pytest.approx(nll / len(video), abs=1e-5)
    assert got["val_loss"] != pytest.approx(classify.metrics(module, replace(ctx, views=(1, 1)))["val_loss"])


class Grid(KeyedDataset):
    """Items whose x names (index, clip, crop): no decoding, so a 2-rank run stays quick."""

    classes = tuple("abcdefg")
    view_axes = ("clips", "crops")
    item_shape = (4,)

    def __len__(self) -> int:
        return 5

    def load(self, index: int, gen) -> dict:
        clip, crop = (0, 0) if gen is None else (gen.clip, gen.crop)
        return {"x": torch.tensor([index, clip, crop, 1.0]), "y": index % 7, "index": index}


def _grid_scores(d: dist.Dist) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    module = Linear(4, 7)
    cfg = RunConfig(train=TrainConfig(batch=4))
    return evaluate.view_scores(module.predict, Grid(), (2, 3), cfg, d)


def _rank_main(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    # a rank whose peer died gives up after 3 minutes instead of dist's 30
    td.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                          timeout=timedelta(minutes=3))
    try:
        torch.save(_grid_scores(dist.Dist(rank, 2)), Path(out, f"{rank}.pt"))
    finally:
        td.destroy_process_group()


def test_views_of_one_item_land_on_different_ranks():
    keys = [evaluate._shard(len(Views(Grid(), 2, 3)), dist.Dist(r, 2)) for r in range(2)]
    ranks_of_item0 = {r for r in range(2) for k, _ in keys[r] if k % 5 == 0}
    assert ranks_of_item0 == {0, 1}


@pytest.mark.slow
def test_two_gloo_ranks_merge_views_as_one_process(tmp_path):
    ranks.rank_0_here(_rank_main, str(tmp_path / "init"), str(tmp_path))
    one = _grid_scores(dist.Dist())
    for r in range(2):
        merged, y = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(merged, one[0], rtol=0, atol=1e-6)
        assert torch.equal(y, one[1])


def test_a_shuffled_gather_merges_the_same():
    torch.manual_seed(3)
    logits, flat = torch.randn(30, 6), torch.arange(30)
    y = flat % 5 % 6
    order = list(range(30))
    random.Random(0).shuffle(order)
    a = evaluate.merge_views(logits, y, flat % 5, 5)
    b = evaluate.merge_views(logits[order], y[order], flat[order] % 5, 5)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert torch.equal(a[1], b[1])



def test_the_test_report_scores_data_test_views(tmp_path):
    module, ctx = video_context(tmp_path)
    task = tasks.get("supervised")
    views = replace(ctx, cfg=replace(ctx.cfg, data=DataConfig(test_views="2x3")))
    got = evaluate.evaluate_test(task, module, views, ctx.val_set)
    want = classify.metrics(module, replace(ctx, views=(2, 3)))
    assert got == {"test_top1": want["val_top1"], "test_loss": want["val_loss"]}
    assert evaluate.evaluate_test(task, module, ctx, ctx.val_set)["test_loss"] == classify.metrics(
        module, ctx)["val_loss"]  # 1x1: the one eval view


def video_run(tmp_path, test: bool = True) -> Path:
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                write_video(tmp_path / split / c / f"{i}.mp4", 30 + 3 * i)
    out = tmp_path / "run"
    held_out = [f"--data.test_path={tmp_path / 'test'}"] if test else []
    assert main(["train", "--out", str(out), "--data.name=video-folder", f"--data.path={tmp_path / 'train'}",
                 *held_out, "--data.val_fraction=0.34", "--data.frames=2",
                 "--data.frame_stride=3", "--data.image_size=16", "--model.patch_size=8", "--train.batch=8",
                 "--train.max_steps=1", "--train.threads=1", "--train.warmup_epochs=0"]) == 0
    return out


def test_eval_takes_test_views_for_a_trained_run(tmp_path, capsys):
    out = video_run(tmp_path)
    one = json.loads((out / "final.json").read_text())  # the run's own test: 1x1, its one checkpoint
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--test-views", "2x3"]) == 0
    six = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert six["val_loss"] == pytest.approx(one["val_loss"])  # validation stays one view
    assert six["test_loss"] != pytest.approx(one["test_loss"])  # the clips differ in time
    assert main(["eval", str(out), "--test-views", "0x3"]) == 2
    assert "data.test_views" in capsys.readouterr().err


def test_eval_refuses_test_views_without_test_data(tmp_path, capsys):
    out = video_run(tmp_path, test=False)
    capsys.readouterr()
    assert main(["eval", str(out), "--test-views", "5x3"]) == 2
    assert "--test-views" in capsys.readouterr().err
