"""How fast cluttered-digits is made and read, and video clips decoded, against peers in the same run.

For each image size: the time to render `--samples` training samples from a fresh dataset
(chunk by chunk, as a run would meet them), then the time of one item load afterwards
(train key and eval key: a cached tensor index, a uint8 -> float conversion and the
normalisation), and the loader's samples/s at batch 64 (workers=0, as the study runs). The
peer line is `digits` (8x8 images upsampled per item), the dataset cluttered-digits replaces.

Video (`--only video`): generated videos (`--videos` of `--seconds` 10 s at 25 fps, 320x240, x264 with a
keyframe every 2 s, or mpeg4 where PyAV has no x264) in a video-folder. Clips/s of the training
loader (16 frames, stride 4, batch 4: read_clip's seek, early stop and frame threading, then the
train transform) with data.workers 0 and 2, against a plain decode of the same clips: one
thread, every frame from the first, the clip's frames converted to RGB (no transform). Both sides
alternate in rounds; each keeps its fastest. Then the wait for an epoch's first batch with 2
workers, after a 1 s pause standing in for the evaluation before it: from the one loader a run
keeps for all its epochs (its workers fetch the batch during the pause) against a new loader each
epoch (as runs had before: its workers start, then decode). Last, the data-wait share
(`data_wait` of metrics.jsonl), over the run and epoch by epoch, of a pico/4-f8 pretraining run of
`--steps` steps (about 3 an epoch) with data.workers 0 and 2.

    python benchmarks/bench_data.py                 # 100,000 samples at 16 and 32 px, 1 thread; video
    python benchmarks/bench_data.py --samples 20000 --sizes 16 --only cluttered
    python benchmarks/bench_data.py --only video --videos 8 --clips 24

Runtime: about 20 s on a 2-core CPU for cluttered-digits, 2.5 min for video (longer on one busy
with other jobs).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vitscale.cli import main as vitscale_main  # noqa: E402
from vitscale.data import DataConfig, EpochSampler, RunBatches, build_datasets, close, make_loader  # noqa: E402
from vitscale.data.generated import CHUNK  # noqa: E402
from vitscale.data.video import clip_indices, decode_threads  # noqa: E402
from vitscale.train.config import TrainConfig  # noqa: E402
from vitscale.train.steps import Plan  # noqa: E402

CLIP = dict(frames=16, frame_stride=4, image_size=112)  # VideoMAE's Kinetics sampling, at 112 px


def item_us(dataset, train: bool, n: int = 2000, rounds: int = 3) -> float:
    """Best-of-rounds microseconds per item over the first n (already rendered) items."""
    keys = [(i, i) if train else i for i in range(n)]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for k in keys:
            dataset[k]
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def loader_rate(dataset, batches: int = 100) -> float:
    """Samples/s of the training loader at batch 64 over `batches` batches (workers=0)."""
    loader = make_loader(dataset, EpochSampler(len(dataset), seed=0), batch_size=64)
    start = time.perf_counter()
    for _ in itertools.islice(loader, batches):
        pass
    return batches * 64 / (time.perf_counter() - start)


def write_videos(root: Path, n: int, seconds: int = 10, fps: int = 25, size=(320, 240), gop: int = 50) -> str:
    """n videos of moving noise in two class folders; returns the codec used."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    w, h = size
    for k in range(n):
        base = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        with av.open(str(root / f"c{k % 2}" / f"{k}.mp4"), "w") as c:
            s = c.add_stream(codec, rate=fps)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.codec_context.gop_size = gop
            if codec == "libx264":
                s.options = {"preset": "veryfast", "keyint": str(gop), "scenecut": "0"}
            for t in range(seconds * fps):
                img = np.roll(base, (t, 3 * t), (0, 1))
                for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
    return codec


def plain_clip(path: str, frames: int, stride: int, gen: torch.Generator, short: int) -> np.ndarray:
    """The peer: one thread, every frame decoded from the first, the clip's frames kept as RGB."""
    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        idx = clip_indices(s.frames, frames, stride, gen)
        kept = {}
        for i, f in enumerate(c.decode(s)):
            if i in idx:
                scale = min(1.0, short / min(f.width, f.height))
                kept[i] = f.to_ndarray(width=round(f.width * scale), height=round(f.height * scale),
                                       format="rgb24")
    return np.stack([kept[i] for i in idx])  # [T, H, W, 3]


def video_rates(train, clips: int, workers: int, rounds: int = 2) -> tuple[float, float]:
    """Best-of-rounds clips/s of (the training loader at batch 4 with `workers`, the plain decode
    of the same clips: same videos, same random starts)."""
    keys = EpochSampler(len(train), seed=0).keys() * (-(-clips // len(train)))
    keys = keys[:clips]
    ours = theirs = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in make_loader(train, keys, batch_size=4, workers=workers):
            pass
        ours = max(ours, clips / (time.perf_counter() - start))
        start = time.perf_counter()
        for index, seed in keys:
            gen = torch.Generator().manual_seed(seed)
            plain_clip(train.samples[index][0], train.frames, train.stride, gen, train.short)
        theirs = max(theirs, clips / (time.perf_counter() - start))
    return ours, theirs


def first_batches(train, workers: int = 2, epochs: int = 4, pause: float = 1.0) -> tuple[float, float]:
    """Mean seconds to the first batch of epochs 2 .. `epochs` (batch 4, `workers` workers), each
    after a `pause` (an evaluation's stand-in) following the epoch before: (one loader for the whole
    run over RunBatches, as the engine has it; a new loader each epoch, as it had)."""
    plan = Plan(TrainConfig(epochs=epochs, batch=4), 1, 1, 1, 1, len(train), 4)
    lasting, fresh = [], []
    batches = iter(make_loader(train, RunBatches(plan, len(train), 0, 0, plan.total, 4), 4, workers))
    try:
        for step in range(plan.total):
            if step in plan.starts[1:]:
                time.sleep(pause)
                start = time.perf_counter()
                next(batches)
                lasting.append(time.perf_counter() - start)
            else:
                next(batches)
    finally:
        close(batches)
    for epoch in range(1, epochs):
        for _ in make_loader(train, EpochSampler(len(train), 0, epoch - 1), 4, workers,
                             sizes=plan.batches(plan.starts[epoch - 1], plan.starts[epoch], 4, 1)):
            pass
        time.sleep(pause)
        start = time.perf_counter()
        next(iter(make_loader(train, EpochSampler(len(train), 0, epoch), 4, workers,
                              sizes=plan.batches(plan.starts[epoch], plan.starts[epoch + 1], 4, 1))))
        fresh.append(time.perf_counter() - start)
    return sum(lasting) / len(lasting), sum(fresh) / len(fresh)


def data_wait(root: Path, workers: int, steps: int) -> tuple[float, float, list[float]]:
    """(data_wait share, samples/s, each epoch's data_wait share) over the epochs of a pico/4-f8
    pretraining run."""
    out = root.parent / f"run-w{workers}"
    argv = ["pretrain", "--model", "pico/4-f8", "--out", str(out), "--data.name=video-folder",
            f"--data.path={root}", "--data.frames=8", "--data.frame_stride=4", "--data.image_size=64",
            "--data.val_fraction=0", f"--data.workers={workers}", "--train.batch=4",
            f"--train.max_steps={steps}", "--train.warmup_epochs=0", "--train.threads=1"]
    if vitscale_main(argv) != 0:
        raise SystemExit(f"the pretraining run with {workers} workers failed")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "data_wait" in r]
    seconds = sum(r["train_s"] for r in rows)  # every epoch's row, weighted by its training time
    return (sum(r["data_wait"] * r["train_s"] for r in rows) / seconds,
            sum(r["samples_per_s"] * r["train_s"] for r in rows) / seconds, [r["data_wait"] for r in rows])


def bench_video(videos: int, clips: int, steps: int, seconds: int = 10) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "videos"
        start = time.perf_counter()
        codec = write_videos(root, videos, seconds)
        print(f"video: {videos} videos of {seconds} s, 25 fps, 320x240, {codec} (keyframe every 50 frames) "
              f"written in {time.perf_counter() - start:.1f} s; clips of {CLIP['frames']} frames, stride "
              f"{CLIP['frame_stride']}, {CLIP['image_size']} px; {clips} clips a side")
        train = build_datasets(DataConfig(name="video-folder", path=str(root), val_fraction=0, **CLIP))[0]
        for workers in (0, 2):
            ours, theirs = video_rates(train, clips, workers)
            threads = decode_threads() if workers == 0 else max(1, decode_threads() // workers)
            print(f"video loader (workers {workers}, decode threads {threads}) vs plain PyAV decode: "
                  f"{ours:.1f} vs {theirs:.1f} clips/s = {ours / theirs:.2f}x")
        lasting, fresh = first_batches(train)
        print(f"video loader epoch start (workers 2, batch 4, after a 1 s pause): first batch after "
              f"{lasting:.2f} s from the run's one loader vs {fresh:.2f} s from a new loader each epoch")
        waits = {w: data_wait(root, w, steps) for w in (0, 2)}
        print(f"pico/4-f8 pretrain ({steps} steps, batch 4, 8 frames x 64 px) data-wait share: "
              + ", ".join(f"workers {w} {share:.0%} ({rate:.1f} samples/s)"
                          for w, (share, rate, _) in waits.items()))
        print("pico/4-f8 pretrain data-wait share by epoch: " + "; ".join(
            f"workers {w} " + " ".join(f"{x:.0%}" for x in each) for w, (_, _, each) in waits.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="training samples to render")
    p.add_argument("--sizes", default="16,32", help="comma-separated image sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the study uses 1)")
    p.add_argument("--only", choices=["cluttered", "video"], help="one part only (default: both)")
    p.add_argument("--videos", type=int, default=16, help="generated videos for the video part")
    p.add_argument("--seconds", type=int, default=10, help="length of each generated video (a clip "
                   "spans 64 frames: at least 3 s)")
    p.add_argument("--clips", type=int, default=32, help="clips a side in the video part")
    p.add_argument("--steps", type=int, default=16, help="steps of each pico video pretraining run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  chunk {CHUNK}")
    if args.only != "cluttered":
        bench_video(args.videos, args.clips, args.steps, args.seconds)
    if args.only == "video":
        return
    for size in map(int, args.sizes.split(",")):
        common = dict(image_size=size, scale_min=1.0)
        train = build_datasets(DataConfig(name="cluttered-digits", train_size=args.samples, **common))[0]
        start = time.perf_counter()
        for k in range(-(-args.samples // CHUNK)):
            train.chunk(k)
        made = time.perf_counter() - start
        peer, _, _, _ = build_datasets(DataConfig(name="digits", **common))
        ours, theirs = item_us(train, True), item_us(peer, True, n=len(peer))
        print(f"cluttered-digits {size}px: {args.samples:,} samples rendered in {made:.2f} s "
              f"({args.samples / made:,.0f}/s, {train.chunk(0)[0].element_size() * size * size} B each)")
        print(f"cluttered-digits {size}px item load vs digits: train {ours:.1f} us vs {theirs:.1f} us = "
              f"{theirs / ours:.2f}x; eval {item_us(train, False):.1f} us")
        print(f"cluttered-digits {size}px loader (batch 64, rendered): {loader_rate(train):,.0f} samples/s "
              f"vs digits {loader_rate(peer, batches=len(peer) // 64):,.0f} samples/s")


if __name__ == "__main__":
    main()
