"""Video decoding with PyAV: which frames a clip takes, and decoding only those.

Clip sampling (as VideoMAE): `frames` frames `stride` apart span ``(frames - 1) * stride + 1``
source frames. Training starts the span at a random frame, eval centers it, and test views
start it at evenly spaced frames (`vitscale.data.views`). A video shorter than the span is
read from frame 0 and padded by repeating its last frame.

Decoding seeks to the keyframe before a clip that starts `SEEK_AFTER` frames or more in, skips
there the non-reference frames the clip does not take, stops after the clip's last frame, and
runs the codec's frame threading (`decode_threads`); all of it gives the frames a plain
single-threaded decode from frame 0 gives (tests/data/test_video_decode.py).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from vitscale.common.errors import UserError
from vitscale.data.views import View

if TYPE_CHECKING:
    import av

SEEK_AFTER = 24  # seek (to the keyframe before the clip) only when it starts this far in
MAX_THREADS = 8  # decoder threads at most with data.decode_threads=0 (each delays output a frame)


def pyav():
    """PyAV, imported where a video is read, so that importing vitscale (and image work) needs
    no PyAV: a machine that has none (a GPU image, a slim install) still runs on images."""
    try:
        import av
    except ImportError as e:
        raise UserError("reading videos needs PyAV: pip install av") from e
    return av


def decode_threads(threads: int = 0) -> int:
    """Decoder threads: `threads` if positive, else (0 = auto) this process's CPUs shared among the
    node's ranks (torchrun's LOCAL_WORLD_SIZE) and, called in a loader worker, the loader's
    workers; at most MAX_THREADS."""
    if threads > 0:
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = torch.utils.data.get_worker_info()
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * (worker.num_workers if worker else 1)
    return max(1, min(MAX_THREADS, cpus // max(1, sharing)))


def clip_indices(total: int, frames: int, stride: int, gen: torch.Generator | View | None) -> list[int]:
    """Source frame indices of one clip: random start with a generator, centered with None, a
    test view's start (`View.clip_start`) with a View."""
    span = (frames - 1) * stride + 1
    room = max(total - span, 0)
    if isinstance(gen, View):
        start = gen.clip_start(total, frames, stride)
    else:
        start = room // 2 if gen is None else int(torch.randint(0, room + 1, (), generator=gen))
    return [min(start + k * stride, total - 1) for k in range(frames)]


def frame_count(container: av.container.InputContainer) -> int:
    """Frames in the first video stream: from the header, else duration x rate, else by decoding."""
    stream = container.streams.video[0]
    if stream.frames > 0:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return max(1, int(math.floor(stream.duration * stream.time_base * rate + 1e-6)))
    if rate and container.duration:
        return max(1, int(math.floor(container.duration / pyav().time_base * rate + 1e-6)))
    n = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return n


def _out_size(w: int, h: int, short: int | None) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is `short`, never upscaled."""
    if not short or min(w, h) <= short:
        return w, h
    f = short / min(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def _to_array(frame: av.VideoFrame, short: int | None) -> np.ndarray:
    w, h = _out_size(frame.width, frame.height, short)
    return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()  # [H, W, 3] uint8


def _decode(container, stream, wanted: list[int], short: int | None, seek: bool) -> dict[int, np.ndarray]:
    """Decode frames `wanted` (sorted, unique); stop after the last one.

    After a seek, frames are known by their timestamps, so the decoder skips the non-reference
    frames (no other frame is predicted from them) that the clip does not take."""
    out: dict[int, np.ndarray] = {}
    rate, tb = stream.average_rate or stream.guessed_rate, stream.time_base
    t0 = stream.start_time or 0
    use_pts = seek and rate is not None and tb is not None
    ctx, take = stream.codec_context, set(wanted)
    ctx.skip_frame = "DEFAULT"
    if use_pts:
        container.seek(t0 + int(wanted[0] / (rate * tb)), stream=stream, backward=True, any_frame=False)
    count = 0
    for packet in container.demux(stream):
        if use_pts:  # a packet's pts is its frame's; one without is decoded
            j = None if packet.pts is None else round(float((packet.pts - t0) * tb * rate))
            ctx.skip_frame = "NONREF" if j is not None and j not in take else "DEFAULT"
        for frame in packet.decode():
            if use_pts:
                if frame.pts is None:
                    return {}  # no timestamps: caller falls back to counting from frame 0
                i = round(float((frame.pts - t0) * tb * rate))
                if not out and i > wanted[0]:
                    return {}  # seek landed past the clip
            else:
                i, count = count, count + 1
            if i in take and i not in out:
                out[i] = _to_array(frame, short)
            if i >= wanted[-1]:
                return out
    return out


def read_clip(path: str, frames: int, stride: int, gen: torch.Generator | View | None,
              short: int | None = None, counts: dict | None = None,
              span: tuple[int, int] = (0, -1), threads: int = 0) -> Tensor:
    """Decode one clip: uint8 [3, T, H, W]; shorter side reduced to `short` if larger.

    The clip is taken from the video's frames `span` = (first, count; -1 = to the end), as if they
    were the whole video (a VideoMAE V2 list's `start count`). `counts` caches frame counts per
    path; `threads` decoder threads (0 = `decode_threads`'s share of the CPUs; 1 = one thread).
    Raises on an unreadable file.
    """
    with pyav().open(path) as container:
        if not container.streams.video:
            raise UserError("no video stream")
        stream = container.streams.video[0]
        n = decode_threads(threads)  # set before the first decode opens the codec
        stream.codec_context.thread_type = "AUTO" if n > 1 else "SLICE"  # AUTO: frame threads if any
        stream.codec_context.thread_count = n
        total = counts.get(path) if counts is not None else None
        if total is None:
            total = frame_count(container)
            if counts is not None:
                counts[path] = total
        first, count = span
        usable = total - first if count < 0 else min(count, total - first)
        if usable < 1:
            raise UserError(f"its listed frames start at {first}, past its end ({total} frames)")
        idx = [first + i for i in clip_indices(usable, frames, stride, gen)]
        wanted = sorted(set(idx))
        seek = wanted[0] >= SEEK_AFTER
        got = _decode(container, stream, wanted, short, seek=True) if seek else {}
        if not got:
            if seek:
                container.seek(0)
            got = _decode(container, stream, wanted, short, seek=False)
    if not got:
        raise UserError("no decodable frames")
    # A frame past the real end (the header over-counted) repeats the last one decoded before it.
    have = sorted(got)
    clip = [got[max([k for k in have if k <= i], default=have[0])] for i in idx]
    return torch.from_numpy(np.stack(clip)).permute(3, 0, 1, 2)  # [T, H, W, 3] -> [3, T, H, W]
