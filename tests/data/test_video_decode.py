"""read_clip's fast path (keyframe seek, early stop, frame threading) gives exactly the frames of a
plain single-threaded PyAV decode from frame 0 (the reference below, written independently)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vitscale.common.errors import UserError
from vitscale.data import DataConfig
from vitscale.data.video import clip_indices, decode_threads, read_clip
from vitscale.data.views import View


def write_textured(path: Path, n: int, codec: str, gop: int, w: int = 64, h: int = 48) -> None:
    """n frames of moving noise (every frame differs everywhere), a keyframe every `gop` frames."""
    base = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":  # B-frames on (x264's default), fixed keyframe interval
            s.options = {"preset": "ultrafast", "bframes": "2", "keyint": str(gop), "scenecut": "0"}
        for k in range(n):
            img = np.roll(base, (k, 2 * k), (0, 1))
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def plain_clip(path: Path, idx: list[int], short: int | None) -> torch.Tensor:
    """Reference: every frame decoded in order on one thread; frame i is the i-th decoded; the
    kept ones scaled (shorter side `short`, never up) to RGB."""
    kept = {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        for i, f in enumerate(c.decode(s)):
            if i in idx:
                w, h, side = f.width, f.height, min(f.width, f.height)
                if short and side > short:
                    w, h = round(w * short / side), round(h * short / side)
                kept[i] = f.to_ndarray(width=w, height=h, format="rgb24")
    return torch.from_numpy(np.stack([kept[i] for i in idx])).permute(3, 0, 1, 2)


@pytest.fixture(scope="module", params=["mpeg4", "libx264"])
def video(request, tmp_path_factory) -> Path:
    if request.param not in av.codecs_available:
        pytest.skip(f"PyAV here has no {request.param} encoder")
    path = tmp_path_factory.mktemp("decode") / f"{request.param}.mp4"
    write_textured(path, 120, request.param, gop=20)
    return path


@pytest.mark.parametrize("threads", [1, 3])
def test_clips_equal_a_plain_full_decode(video, threads):
    cases = [(4, 3, None, (0, -1)), (8, 2, None, (0, -1)), (4, 5, View(2, 3, 0, 1), (0, -1)),
             (4, 2, None, (70, 30)), (3, 4, None, (100, -1)), (16, 1, None, (0, 10))]  # last: padded
    cases += [(4, 7, torch.Generator().manual_seed(seed), (5, 90)) for seed in range(4)]
    for frames, stride, gen, (first, count) in cases:
        usable = 120 - first if count < 0 else min(count, 120 - first)
        if isinstance(gen, torch.Generator):  # the same draw for the reference
            idx = clip_indices(usable, frames, stride, torch.Generator().set_state(gen.get_state()))
        else:
            idx = clip_indices(usable, frames, stride, gen)
        want = plain_clip(video, [first + i for i in idx], 40)
        got = read_clip(str(video), frames, stride, gen, 40, span=(first, count), threads=threads)
        assert torch.equal(got, want), (frames, stride, first, count)
    assert read_clip(str(video), 2, 30, None, threads=threads).shape == (3, 2, 48, 64)  # no scaling


def test_decode_threads_auto_shares_the_cpus_among_ranks_and_workers(monkeypatch):
    assert decode_threads(5) == 5
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert decode_threads(0) == 8  # main process: all CPUs, capped
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: type("W", (), {"num_workers": 4}))
    assert decode_threads(0) == 4  # 16 CPUs among 4 workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decode_threads(0) == 2  # ... of each of 2 ranks on the node
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert decode_threads(0) == 1


def test_negative_decode_threads_are_refused():
    with pytest.raises(UserError, match="data.decode_threads"):
        DataConfig(decode_threads=-1)
