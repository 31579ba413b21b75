"""Built-in datasets that need no network: sklearn digits and generated moving digits.

``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (values 0..16), upsampled
bilinearly to the image size, gray repeated to 3 channels so the RGB ViT applies unchanged.

``moving-digits``: clips of one or two of those digits bouncing inside the frame, a small
Moving-MNIST (Srivastava et al. 2015). Clip i is generated from (seed, i) alone, on the fly.
Labels: ``digit`` = class of the main (bright) digit; ``direction`` = its initial direction
of motion as one of 8 compass directions, counter-clockwise from east with up = north:
0 E, 1 NE, 2 N, 3 NW, 4 W, 5 SW, 6 S, 7 SE. The main digit moves freely (no wall contact)
for at least the first half of the clip, so the labelled direction is visible; afterwards it
reflects off the walls. A second digit (digits_per_clip=2) is drawn at half brightness as a
distractor with its own motion. Train, val and test use disjoint clip indices and disjoint
source digit images.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitscale.common.errors import UserError
from vitscale.data.common import KeyedDataset, held_out
from vitscale.data.transforms import ClipTransform

DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
DIGIT_SHARE = 0.4  # moving digit side as a share of the frame side
DISTRACTOR_GAIN = 0.5  # brightness of the second digit


@cache
def sklearn_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images [N, 8, 8] float in [0, 1] and labels [N] long.

    Read from the file scikit-learn ships (digits.csv.gz: 64 pixel values 0-16, then the label,
    a row per digit), as its load_digits reads it, without importing scikit-learn: that import
    (scipy.stats and more) took 2.6 s of every training process's start."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in digits come with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    images = rows[:, :-1].reshape(-1, 8, 8)
    return torch.from_numpy(images / 16.0).float(), torch.from_numpy(rows[:, -1].astype(int)).long()


def upsample(img: Tensor, size: int) -> Tensor:
    """[8, 8] -> [size, size] bilinear."""
    return F.interpolate(img[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


class Digits(KeyedDataset):
    """sklearn digits as 3 x size x size images; `members` picks the split."""

    classes = DIGIT_CLASSES

    def __init__(self, members: list[int], size: int, transform: ClipTransform):
        self.members, self.size, self.transform = members, size, transform
        self.images, labels = sklearn_digits()
        self.labels = labels[members].tolist()

    def __len__(self) -> int:
        return len(self.members)

    def load(self, index: int, gen: torch.Generator | None) -> dict:
        img = upsample(self.images[self.members[index]], self.size).clamp_(0, 1)
        x = img.expand(3, -1, -1)  # [3, H, W] gray as RGB
        return {"x": self.transform(x, gen), "y": self.labels[index], "index": index}


def bounce(p0: np.ndarray, v: np.ndarray, t: np.ndarray, span: float) -> np.ndarray:
    """Positions in [0, span] of a point moving at v and reflecting off both walls.

    p0, v: [2]; t: [T] -> [T, 2]. Unfolds the motion on a line of period 2*span (triangle wave).
    """
    q = np.mod(p0[None] + v[None] * t[:, None], 2 * span)  # [T, 2]
    return np.where(q > span, 2 * span - q, q)


class MovingDigits(KeyedDataset):
    """Generated bouncing-digit clips; item i of this split is clip ``offset + i`` of the seed."""

    def __init__(self, n: int, offset: int, sources: list[int], size: int, frames: int, label: str,
                 digits_per_clip: int, seed: int, transform: ClipTransform):
        self.n, self.offset, self.sources = n, offset, sources
        self.size, self.frames, self.label = size, frames, label
        self.digits_per_clip, self.seed, self.transform = digits_per_clip, seed, transform
        self.digit_side = max(4, round(size * DIGIT_SHARE))
        self.images, self.digit_labels = sklearn_digits()
        self.classes = DIRECTIONS if label == "direction" else DIGIT_CLASSES

    def __len__(self) -> int:
        return self.n

    def motion(self, rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
        """Direction id, start position [2] (y, x) and velocity [2] in pixels per frame."""
        direction = int(rng.integers(8))
        angle = direction * math.pi / 4
        speed = rng.uniform(1.0, 2.0) * self.size / 32
        v = speed * np.array([-math.sin(angle), math.cos(angle)])  # (y, x): north is -y
        v[np.abs(v) < 1e-9] = 0.0
        span = self.size - self.digit_side
        # Free flight for the first half of the clip where the frame allows it.
        free = min(max(1, self.frames // 2), math.floor(span / speed))
        lo = np.where(v < 0, -v * free, 0.0)
        hi = np.where(v > 0, span - v * free, span)
        return direction, lo + rng.random(2) * (hi - lo), v

    def clip(self, clip_id: int) -> tuple[Tensor, int, int]:
        """Clip ``clip_id``: frames [T, S, S] in [0, 1], digit class, direction id."""
        rng = np.random.default_rng([self.seed & (2**63 - 1), clip_id])
        frames = torch.zeros(self.frames, self.size, self.size)
        t = np.arange(self.frames, dtype=np.float64)
        span = self.size - self.digit_side
        labels = None
        for k in range(self.digits_per_clip):
            src = self.sources[int(rng.integers(len(self.sources)))]
            direction, p0, v = self.motion(rng)
            glyph = upsample(self.images[src], self.digit_side).clamp_(0, 1)
            glyph = glyph * (1.0 if k == 0 else DISTRACTOR_GAIN)
            pos = np.rint(bounce(p0, v, t, span)).astype(int)  # [T, 2] top-left (y, x)
            for f, (y, x) in enumerate(pos):
                window = frames[f, y : y + self.digit_side, x : x + self.digit_side]
                torch.maximum(window, glyph, out=window)
            if labels is None:
                labels = (int(self.digit_labels[src]), direction)
        return frames, labels[0], labels[1]

    def load(self, index: int, gen: torch.Generator | None) -> dict:
        frames, digit, direction = self.clip(self.offset + index)
        x = frames.unsqueeze(0).expand(3, -1, -1, -1)  # [3, T, S, S] gray as RGB
        if self.frames == 1:
            x = x[:, 0]  # [3, S, S]: an image
        y = direction if self.label == "direction" else digit
        return {"x": self.transform(x, gen), "y": y, "index": index}


def build_builtin(cfg, train_tf: ClipTransform,
                  eval_tf: ClipTransform) -> tuple[KeyedDataset, KeyedDataset, KeyedDataset]:
    """(train, val, test) for cfg.name in digits / moving-digits: val and test from source digits
    of their own (`held_out`); moving-digits' val clips are the last, test's just before them."""
    _, labels = sklearn_digits()
    train_src, val_src, test_src = held_out(labels.numpy(), cfg.val_fraction, cfg.test_share, cfg.seed)
    if cfg.name == "digits":
        return (Digits(train_src, cfg.image_size, train_tf), Digits(val_src, cfg.image_size, eval_tf),
                Digits(test_src, cfg.image_size, eval_tf))
    n_val = int(round(cfg.num_clips * cfg.val_fraction))
    n_test = int(round(cfg.num_clips * cfg.test_share))
    n_train = cfg.num_clips - n_val - n_test
    common = dict(size=cfg.image_size, frames=cfg.frames, label=cfg.label,
                  digits_per_clip=cfg.digits_per_clip, seed=cfg.seed)
    train = MovingDigits(n_train, 0, train_src, transform=train_tf, **common)
    test = MovingDigits(n_test, n_train, test_src or train_src, transform=eval_tf, **common)
    val = MovingDigits(n_val, n_train + n_test, val_src or train_src, transform=eval_tf, **common)
    return train, val, test
