"""``cluttered-digits``: real handwritten digits in clutter, generated without limit.

A cluttered translated MNIST (Mnih et al. 2014, "Recurrent Models of Visual Attention",
sec. 4.1: a digit on a larger canvas among fragments of other digits) made from
scikit-learn's 1,797 real 8x8 digits, so it needs no download, yet gives a scaling study as
many samples as it reads and a validation set large enough to measure small differences.

Sources. The 1,797 digits are split by source first (`stratified_split` with
data.val_fraction and data.seed); training samples draw every stroke (target and clutter)
from training sources only, validation samples from validation sources only, so validation
never shows a digit seen in training. Test samples (data.test_size) are drawn from the
validation sources too, from a seed stream of their own (split id 2): scenes neither split
holds, of digits training never saw (they share glyphs with validation, not samples).

A sample is drawn on a black `canvas` x `canvas` image (data.canvas, default 32 px), in
canvas units (the canvas spans [-1, 1]^2, so a unit is canvas/2 px):

1. Target: a source digit, its 8x8 box 2s units wide with s log-uniform in SIDE (10 to 22
   px of 32), rotated by U(-ROTATE, ROTATE) degrees and sheared along x by U(-SHEAR, SHEAR),
   brightness U(TARGET_GAIN); its centre is uniform over SHIFT of the room that keeps the
   whole box on the canvas (per axis: |centre| <= SHIFT * (1 - half extent)).
2. FRAGMENTS fragments: a 4x4-pixel window (a quarter) at a uniform place in a uniform
   source digit, sized, rotated and sheared as a target would be, brightness
   U(FRAGMENT_GAIN), centred on a uniform canvas pixel (so partly off the canvas at times).
3. LINES strokes: a straight bar 1 px thick on the canvas, length U(LINE_LENGTH) units, a
   uniform angle, brightness U(LINE_GAIN), centred on a uniform canvas pixel.
4. Fragments and strokes add up (each drawn on a patch of half the canvas side, then pasted
   at its pixel); the target is combined with them by maximum; Gaussian noise of std NOISE is
   added to every canvas pixel; the result is clamped to [0, 1].

Every glyph is drawn by bilinear sampling of its 8x8 or 4x4 source (`grid_sample`), so it
is antialiased at any canvas size. The canvas is then resized to data.image_size with the
transforms' resize (bilinear, antialiased when shrinking) and stored as uint8. The scene
never depends on image_size: a 16 px sample is the 32 px one downsampled, which blurs thin
strokes and small digits together (a canvas larger than image_size adds nothing beyond
what the resize keeps; an image_size above the canvas upsamples it). Labels: the target's
class, 10 classes; nothing else in the scene is labelled.

Difficulty, chosen for the default scaling study (16,384 samples, batch 32: pico/4 at 16 px
about 62%, its 4x deeper and 4x wider muP versions 65% and 62%), measured with 1 CPU thread,
val_size 10,000 (a standard error of about 0.5 points), a wsd schedule over one epoch:

    vitscale train --model pico/4 --data.name=cluttered-digits --data.image_size=16 \
        --data.scale_min=1 --data.train_size=16384 --train.batch=32 --train.base_lr=0.016 \
        --train.epochs=1 --train.warmup_epochs=0.05 --train.schedule=wsd --out runs/cd16

    pico/4, 16 px, 16,384 samples, batch 32: 61.8% (about 20 s); with the target anywhere
    (SHIFT 1) it stays near chance at this length. With 3 fragments, 2 strokes and SHIFT 0.3
    at batch 64 / lr 1e-3: 16 px 50,000 samples 61.6%, 200,000 82.5%; 32 px 50,000 54.7%.

Determinism. Samples come in chunks of CHUNK consecutive indices; chunk k of a split draws
every parameter and the noise from ``np.random.default_rng([seed, split id, k])``, so a
sample is a pure function of (data.seed, split, index): not of train_size, image_size, the
process or the load order. Each process renders a chunk the first time one of its items is
asked for and keeps it (image_size^2 bytes a sample), so later loads are a tensor index.
The key's sample seed drives only the train transform (none with scale_min=1, no flip).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitscale.data.builtin import DIGIT_CLASSES, sklearn_digits
from vitscale.data.common import KeyedDataset, stratified_split
from vitscale.data.transforms import ClipTransform, resized_crop

CHUNK = 1024  # samples drawn and rendered together; part of the seed, so fixed
SPLITS = {"train": 0, "val": 1, "test": 2}  # split id in the chunk seed
SIDE = (0.3, 0.7)  # target half side s in canvas units (log-uniform): 10 to 22 px of 32
SHIFT = 0.15  # target centre: uniform over this share of the room that keeps its box on the canvas
ROTATE = 20.0  # degrees, either way
SHEAR = 0.3  # x-shear, either way
TARGET_GAIN = (0.7, 1.0)  # target brightness
FRAGMENTS = 2  # fragments of other digits per sample
FRAGMENT_GAIN = (0.4, 0.8)  # fragment brightness: mostly dimmer than the target
LINES = 1  # straight strokes per sample
LINE_LENGTH = (0.3, 0.9)  # stroke length in canvas units
LINE_GAIN = (0.4, 0.9)  # stroke brightness
NOISE = 0.08  # std of the Gaussian pixel noise
# A stroke is this 4x4 bar stretched: its two inked rows are 1 px wide on the canvas.
BAR = torch.tensor([[0.0] * 4, [1.0] * 4, [1.0] * 4, [0.0] * 4])


class Scene(NamedTuple):
    """Everything random about N samples: a target and K = FRAGMENTS + LINES clutter pieces.

    A glyph (target: an 8x8 digit; piece: a 4x4 window of one, or `BAR`) spans [-1, 1]^2 in
    its own units; `shape` maps those to canvas units (the canvas spans [-1, 1]^2).
    """

    source: Tensor  # [N] long: sklearn index of the target digit
    shape: Tensor  # [N, 2, 2] target's linear map, (x, y)
    centre: Tensor  # [N, 2] target's centre (x, y) in canvas units
    gain: Tensor  # [N] target brightness
    piece_source: Tensor  # [N, K] long: sklearn index of each fragment's digit (unused for strokes)
    window: Tensor  # [N, K, 2] long: (row, col) of a fragment's 4x4 window in its digit
    piece_shape: Tensor  # [N, K, 2, 2] each piece's linear map; pieces 0..FRAGMENTS-1 are fragments
    offset: Tensor  # [N, K, 2] long: (row, col) of a piece's centre on the canvas, in pixels
    piece_gain: Tensor  # [N, K] piece brightness
    noise: Tensor  # [N, S, S] standard normal, one per canvas pixel

    def take(self, rows: slice | Tensor) -> Scene:
        """The scene of a subset of samples."""
        return Scene(*(t[rows] for t in self))


def linear_map(angle: Tensor, shear: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """[...] -> [..., 2, 2]: rotation @ x-shear @ diag(sx, sy), acting on (x, y)."""
    c, s = angle.cos(), angle.sin()
    row_x = torch.stack([c * sx, (c * shear - s) * sy], -1)
    row_y = torch.stack([s * sx, (s * shear + c) * sy], -1)
    return torch.stack([row_x, row_y], -2)


def draw_scene(sources: np.ndarray, canvas: int, rng: np.random.Generator, n: int = CHUNK) -> Scene:
    """Draw n samples' parameters and noise from `rng`; digits from `sources` (sklearn indices)."""
    k, f = FRAGMENTS + LINES, FRAGMENTS

    def uniform(bounds, *shape):
        return torch.from_numpy(rng.uniform(*bounds, size=shape).astype(np.float32))

    def digit_map(*shape):  # a digit's rotation, shear and log-uniform half side
        side = uniform(np.log(SIDE), *shape).exp()
        turn = uniform((-math.radians(ROTATE), math.radians(ROTATE)), *shape)
        return linear_map(turn, uniform((-SHEAR, SHEAR), *shape), side, side)

    source = torch.from_numpy(sources[rng.integers(len(sources), size=n)])
    shape = digit_map(n)
    reach = shape.abs().sum(-1).clamp(max=1)  # [N, 2] half extent of the target's box
    centre = uniform((-SHIFT, SHIFT), n, 2) * (1 - reach)  # the whole box stays on the canvas
    gain = uniform(TARGET_GAIN, n)
    piece_source = torch.from_numpy(sources[rng.integers(len(sources), size=(n, k))])
    window = torch.from_numpy(rng.integers(0, 5, size=(n, k, 2)))
    # A fragment is half a digit (4 of 8 px), so half a digit's size; a stroke is 1 px thick.
    fragment = digit_map(n, f) / 2
    length = uniform(LINE_LENGTH, n, k - f)
    bar = linear_map(uniform((0, math.pi), n, k - f), torch.zeros(n, k - f), length / 2,
                     torch.full((n, k - f), 2 / canvas))
    piece_shape = torch.cat([fragment, bar], 1)
    offset = torch.from_numpy(rng.integers(0, canvas, size=(n, k, 2)))
    piece_gain = torch.cat([uniform(FRAGMENT_GAIN, n, f), uniform(LINE_GAIN, n, k - f)], 1)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    noise = torch.randn(n, canvas, canvas, generator=noise_gen)
    return Scene(source, shape, centre, gain, piece_source, window, piece_shape, offset, piece_gain, noise)


def sample(glyphs: Tensor, shape: Tensor, centre: Tensor, side: int) -> Tensor:
    """Draw glyphs [B, h, w] through their maps onto side x side grids: [B, side, side].

    Point p of the grid (units: it spans [-1, 1]^2) shows glyph point shape^-1 (p - centre).
    """
    b = glyphs.shape[0]
    inverse = torch.linalg.inv(shape)  # [B, 2, 2]
    theta = torch.cat([inverse, -(inverse @ centre[..., None])], -1)  # [B, 2, 3]
    c = (torch.arange(side, dtype=torch.float32) + 0.5) * (2 / side) - 1  # pixel centres
    y, x = torch.meshgrid(c, c, indexing="ij")
    points = torch.stack([x.reshape(-1), y.reshape(-1), torch.ones(side * side)])  # [3, side^2]
    # What affine_grid computes, several times faster on CPU: [B, 2, 3] @ [3, side^2]; grid_sample
    # reads a contiguous grid more than twice as fast as this permuted view, copy included.
    grid = torch.bmm(theta, points.expand(b, 3, -1)).view(b, 2, side, side).permute(0, 2, 3, 1).contiguous()
    out = F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


def draw_pieces(scene: Scene, canvas: int) -> Tensor:
    """The clutter, pasted (added) onto an empty canvas: [N, S, S]."""
    n, k = scene.piece_gain.shape
    images, _ = sklearn_digits()
    rows = torch.arange(4)
    r = scene.window[..., 0, None, None] + rows[:, None]  # [N, K, 4, 1]
    c = scene.window[..., 1, None, None] + rows  # [N, K, 1, 4]
    glyphs = images[scene.piece_source[..., None, None], r, c]  # [N, K, 4, 4] windows
    glyphs[:, FRAGMENTS:] = BAR
    half = canvas // 2  # a piece is drawn on a patch of half the canvas side, then pasted
    patches = sample(glyphs.reshape(n * k, 4, 4), 2 * scene.piece_shape.reshape(n * k, 2, 2),
                     torch.zeros(n * k, 2), half)  # x2: a canvas unit is two patch units
    patches = patches.view(n, k, half, half) * scene.piece_gain[..., None, None]
    # Paste onto a canvas padded by half a patch on each side, at each piece's offset.
    side = canvas + half
    top_left = (torch.arange(n)[:, None] * side + scene.offset[..., 0]) * side + scene.offset[..., 1]
    within = (torch.arange(half)[:, None] * side + torch.arange(half)).reshape(-1)  # [half^2]
    index = (top_left[..., None] + within).reshape(-1)  # [N * K * half^2]
    padded = torch.zeros(n * side * side)
    padded.index_add_(0, index, patches.reshape(-1))  # overlaps add up (clamped later): 2x faster than max
    lo = half // 2
    return padded.view(n, side, side)[:, lo : lo + canvas, lo : lo + canvas]


def render(scene: Scene, canvas: int) -> Tensor:
    """Scene -> canvas images [N, S, S] float in [0, 1]; each sample independent of the others."""
    images, _ = sklearn_digits()
    target = sample(images[scene.source], scene.shape, scene.centre, canvas) * scene.gain[:, None, None]
    ink = torch.maximum(target, draw_pieces(scene, canvas))
    return (ink + NOISE * scene.noise).clamp_(0, 1)


class ChunkCache:
    """Rendered chunks of every cluttered-digits dataset of this process, least recently used
    dropped first beyond `limit` bytes: a study's runs build new datasets, not new images."""

    def __init__(self, limit: int):
        self.limit, self.bytes, self.items = limit, 0, OrderedDict()
        self.renders = 0  # chunks rendered so far (for tests)

    def __contains__(self, key) -> bool:
        return key in self.items

    def get(self, key) -> tuple[Tensor, Tensor]:
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value: tuple[Tensor, Tensor]) -> None:
        self.items[key] = value
        self.bytes += value[0].nbytes
        self.renders += 1
        while self.bytes > self.limit and len(self.items) > 1:
            _, (x, _) = self.items.popitem(last=False)
            self.bytes -= x.nbytes


CACHE = ChunkCache(limit=1 << 30)  # 1 GiB: 64k samples at 128 px, 4M at 16 px


class ClutteredDigits(KeyedDataset):
    """`n` generated samples of one split, rendered lazily in chunks and kept as uint8."""

    classes = DIGIT_CLASSES

    def __init__(self, split: str, n: int, sources: list[int], canvas: int, size: int, seed: int,
                 transform: ClipTransform):
        self.split, self.n, self.sources = split, n, np.asarray(sources, dtype=np.int64)
        self.canvas, self.size, self.seed, self.transform = canvas, size, seed, transform
        self.key = (split, self.sources.tobytes(), canvas, size, seed)  # what a chunk depends on, but k

    def __len__(self) -> int:
        return self.n

    def scene(self, chunk: int) -> Scene:
        """The parameters and noise of chunk `chunk` (samples chunk*CHUNK ...)."""
        rng = np.random.default_rng([self.seed & (2**63 - 1), SPLITS[self.split], chunk])
        return draw_scene(self.sources, self.canvas, rng)

    def images(self, scene: Scene) -> Tensor:
        """Scene -> uint8 [N, size, size] at the output size."""
        x = render(scene, self.canvas)
        box = (0, 0, self.canvas, self.canvas)
        x = resized_crop(x, box, self.size)  # [N, size, size]: N plays the channels
        return x.mul_(255).round_().to(torch.uint8)

    def chunk(self, k: int) -> tuple[Tensor, Tensor]:
        """Chunk k's (uint8 images [CHUNK, size, size], labels [CHUNK]), rendered on first use in
        this process and kept in the process-wide cache (every run of a study shares it)."""
        key = (*self.key, k)
        if key not in CACHE:
            scene = self.scene(k)
            CACHE.put(key, (self.images(scene), sklearn_digits()[1][scene.source]))
        return CACHE.get(key)

    def load(self, index: int, gen: torch.Generator | None) -> dict:
        x, y = self.chunk(index // CHUNK)
        row = index % CHUNK
        img = x[row].expand(3, -1, -1)  # [3, S, S] gray as RGB
        return {"x": self.transform(img, gen), "y": int(y[row]), "index": index}

    def load_batch(self, keys: list[tuple[int, int | None]]) -> dict | None:
        """The batch of `keys` in one tensor index a chunk, where the transform draws nothing."""
        train = keys[0][1] is not None
        if any((seed is not None) != train for _, seed in keys) or not self.transform.fixed(train):
            return None
        index = torch.tensor([i for i, _ in keys], dtype=torch.long)
        chunks, at = (index // CHUNK).unique(return_inverse=True)  # the chunks read, and each key's
        images, labels = zip(*(self.chunk(k) for k in chunks.tolist()), strict=True)
        rows = at * CHUNK + index % CHUNK  # each key's row of the chunks read, end to end
        x, y = torch.cat(images)[rows], torch.cat(labels)[rows]
        x = self.transform.batch(x[:, None].expand(-1, 3, -1, -1), train)  # gray as RGB
        return {"x": x, "y": y, "index": index, "skipped": []}


def build_cluttered(cfg, train_tf: ClipTransform,
                    eval_tf: ClipTransform) -> tuple[ClutteredDigits, ClutteredDigits, ClutteredDigits]:
    """(train, val, test) for data.name=cluttered-digits; no validation nor test when val_fraction
    is 0 (test draws from the validation sources)."""
    _, labels = sklearn_digits()
    train_src, val_src = stratified_split(labels.numpy(), cfg.val_fraction, cfg.seed)
    common = dict(canvas=cfg.canvas, size=cfg.image_size, seed=cfg.seed)
    train = ClutteredDigits("train", cfg.train_size, train_src, transform=train_tf, **common)
    val = ClutteredDigits("val", cfg.val_size if val_src else 0, val_src, transform=eval_tf, **common)
    test = ClutteredDigits("test", cfg.test_size if val_src else 0, val_src, transform=eval_tf, **common)
    return train, val, test
