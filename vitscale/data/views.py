"""Test views: each held-out item scored over several clips x crops (VideoMAE's test protocol).

VideoMAE (Tong et al. 2022) tests Kinetics with 5 clips x 3 crops and Something-Something
with 2 x 3: the clips start at evenly spaced positions of the video, the crops sit at the
start, middle and end of the frame's longer side, and a video's score is the mean of the
softmax over its views (the averaging is `vitscale.tasks.evaluate.view_scores`).

A `View` stands where a dataset's `load(index, gen)` takes its generator: a generator draws
a training sample, None takes the eval view (centered clip, center crop), and a View takes
view (clip, crop) of a grid, with no randomness, so an item stays a pure function of its
key. One clip is the centered eval clip and one crop the eval center crop, so view (0, 0)
of a 1 x 1 grid is the eval item, bit for bit.

`Views` lists every (item, view) pair of a dataset as one keyed dataset (view-major, as
VideoMAE lists them); its items' "index" is the pair's flat id, so evaluation shards,
gathers and merges them like any items.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitscale.common.errors import UserError
from vitscale.data.common import KeyedDataset, Skipped

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels
MAX_VIEWS = 100  # clips x crops at most (VideoMAE's largest grid is 5 x 3)


def parse_views(spec: str) -> tuple[int, int]:
    """'5x3' -> (clips, crops); UserError naming data.test_views on anything else."""
    m = re.fullmatch(r"\s*([0-9]{1,3})\s*[xX]\s*([0-9]{1,3})\s*", str(spec))
    clips, crops = (int(m[1]), int(m[2])) if m else (0, 0)
    if not (clips >= 1 and crops >= 1 and clips * crops <= MAX_VIEWS):
        raise UserError(f"data.test_views must be CLIPSxCROPS with each at least 1 and at most {MAX_VIEWS} "
                         f"views in all, e.g. 1x1 (one view), 5x3 or 2x3 (VideoMAE's); got {spec!r}")
    return clips, crops


@dataclass(frozen=True)
class View:
    """View (clip, crop) of a clips x crops grid."""

    clip: int  # 0 .. clips - 1
    clips: int
    crop: int  # 0 .. crops - 1
    crops: int

    def clip_start(self, total: int, frames: int, stride: int) -> int:
        """Source frame where this view's clip of `frames` frames `stride` apart starts.

        One clip: the centered eval clip. Several (VideoMAE's test): the video taken every
        `stride` frames has L = ceil(total / stride) frames, and clip c of n starts at frame
        int(c * (L - frames) / (n - 1)) of those (0 for all when L <= frames).
        """
        if self.clips == 1:
            return max(total - ((frames - 1) * stride + 1), 0) // 2
        taken = -(-total // stride)
        step = max(taken - frames, 0) / (self.clips - 1)
        return stride * int(self.clip * step)

    def box(self, h: int, w: int, share: float) -> Box:
        """This view's square crop of side `share` x the shorter side, of an h x w frame.

        One crop: the eval center crop. Several (VideoMAE's test): crop j of n starts at
        int(j * (long - side) / (n - 1)) along the longer side, centered on the shorter.
        """
        side = max(1, round(min(h, w) * share))
        room = max(h, w) - side
        along = room // 2 if self.crops == 1 else int(self.crop * (room / (self.crops - 1)))
        across = (min(h, w) - side) // 2
        return (along, across, side, side) if h >= w else (across, along, side, side)


def distinct(dataset: KeyedDataset, clips: int, crops: int) -> tuple[int, int]:
    """The (clips, crops) that differ on `dataset`: an axis not in its `view_axes` collapses to
    one (built-in clips are generated exactly data.frames long and square; an image has one
    instant), so no forward pass is spent on a copy of a view."""
    axes = dataset.view_axes
    return (clips if "clips" in axes else 1), (crops if "crops" in axes else 1)


class Views(KeyedDataset):
    """Every item of `base` under every view of a clips x crops grid: flat item k is view
    k // len(base) (clip v // crops, crop v % crops) of item k % len(base), and carries
    "index" k. Eval keys only (every view is fixed)."""

    def __init__(self, base: KeyedDataset, clips: int, crops: int):
        self.base, self.clips, self.crops = base, clips, crops
        self.classes, self.strict, self.item_shape = base.classes, base.strict, base.item_shape

    def __len__(self) -> int:
        return len(self.base) * self.clips * self.crops

    def load(self, index: int, gen) -> dict | Skipped:
        if gen is not None:
            raise ValueError("test views are fixed: use eval keys (index, None)")
        v, item = divmod(index, len(self.base))
        got = self.base.load(item, View(v // self.crops, self.clips, v % self.crops, self.crops))
        return {**got, "index": index} if got else got
