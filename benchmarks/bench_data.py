"""How fast cluttered-digits is made and read, against the real `digits` read in the same run.

For each image size: the time to render `--samples` training samples from a fresh dataset
(chunk by chunk, as a run would meet them), then the time of one item load afterwards
(train key and eval key: a cached tensor index, a uint8 -> float conversion and the
normalisation), and the loader's samples/s at batch 64 (workers=0, as the study runs). The
peer line is `digits` (8x8 images upsampled per item), the dataset cluttered-digits replaces.

    python benchmarks/bench_data.py                 # 100,000 samples at 16 and 32 px, 1 thread
    python benchmarks/bench_data.py --samples 20000 --sizes 16

Runtime: about 20 s on a 2-core CPU (longer on one busy with other jobs).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import time
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vitscale.data import DataConfig, EpochSampler, build_datasets, make_loader  # noqa: E402
from vitscale.data.generated import CHUNK  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="training samples to render")
    p.add_argument("--sizes", default="16,32", help="comma-separated image sizes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the study uses 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  chunk {CHUNK}")
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
              f"({args.samples / made:,.0f}/s, {train.chunks[0][0].element_size() * size * size} B each)")
        print(f"cluttered-digits {size}px item load vs digits: train {ours:.1f} us vs {theirs:.1f} us = "
              f"{theirs / ours:.2f}x; eval {item_us(train, False):.1f} us")
        print(f"cluttered-digits {size}px loader (batch 64, rendered): {loader_rate(train):,.0f} samples/s "
              f"vs digits {loader_rate(peer, batches=len(peer) // 64):,.0f} samples/s")


if __name__ == "__main__":
    main()
