"""RandAugment (Cubuk et al. 2020) as timm's ``rand-m9-mstd0.5-inc1`` (DeiT), in plain torch.

The ops work on 8-bit pixels, as PIL's ImageOps / ImageEnhance / Image.transform (which timm's
RandAugment calls) do: a uint8 ``[C, H, W]`` image or ``[C, T, H, W]`` clip in, the same out.
A clip gets one op list and one magnitude for all its frames; statistics (autocontrast's range,
equalize's histogram, contrast's mean) are each frame's own, as PIL sees one frame at a time.
Every random choice comes from the `torch.Generator` passed in.

    policy = RandAugment.parse("rand-m9-mstd0.5-inc1")
    x = policy(x_uint8, gen, fill=(124, 116, 104))
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LEVEL_MAX = 10.0  # magnitudes are on a 0..10 scale (timm's _LEVEL_DENOM)


# ----------------------------------------------------------------------------- pixel ops
def _frames(x: Tensor) -> Tensor:
    """[C, H, W] or [C, T, H, W] -> [C, T, H*W]: one row of pixels per channel and frame."""
    return x.reshape(x.shape[0], x.shape[1] if x.ndim == 4 else 1, -1)


def _lut(x: Tensor, table: Tensor) -> Tensor:
    """Apply a per-(channel, frame) look-up table [C, T, 256] (or one [256] for all) to uint8 x."""
    flat = _frames(x).long()  # [C, T, P]
    if table.ndim == 1:
        return table[flat].reshape(x.shape)
    return table.gather(-1, flat).reshape(x.shape)


def invert(x: Tensor) -> Tensor:
    """ImageOps.invert: 255 - x."""
    return 255 - x


def posterize(x: Tensor, bits: int) -> Tensor:
    """ImageOps.posterize: keep the `bits` high bits (8 or more: unchanged, as timm)."""
    return x if bits >= 8 else x & (~(2 ** (8 - bits) - 1) & 255)


def solarize(x: Tensor, threshold: int) -> Tensor:
    """ImageOps.solarize: invert every value at or above `threshold`."""
    return torch.where(x.int() >= threshold, 255 - x, x)  # (int: a uint8 tensor would wrap 256 to 0)


def solarize_add(x: Tensor, add: int, threshold: int = 128) -> Tensor:
    """timm's solarize_add: values below `threshold` get `add` (capped at 255)."""
    return torch.where(x < threshold, (x.int() + add).clamp(max=255).to(x.dtype), x)


def autocontrast(x: Tensor) -> Tensor:
    """ImageOps.autocontrast (no cutoff): stretch each channel's [lo, hi] to [0, 255], truncating."""
    flat = _frames(x)
    lo, hi = flat.amin(-1, keepdim=True).double(), flat.amax(-1, keepdim=True).double()  # [C, T, 1]
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # (a Python 255.0 / t multiplies by 1/t)
    levels = torch.arange(256, dtype=torch.float64)
    table = (levels * scale - lo * scale).floor().clamp(0, 255)  # int() of a value >= 0 for used levels
    table = torch.where(hi > lo, table, levels)  # a flat channel is left as it is
    return _lut(x, table.to(torch.uint8))


def equalize(x: Tensor) -> Tensor:
    """ImageOps.equalize: each channel's histogram flattened by PIL's integer rule."""
    flat = _frames(x).long()  # [C, T, P]
    hist = torch.zeros(*flat.shape[:2], 256, dtype=torch.long).scatter_add_(-1, flat, torch.ones_like(flat))
    last = 255 - (hist.flip(-1) > 0).long().argmax(-1, keepdim=True)  # highest used level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255  # [C, T, 1]
    before = hist.cumsum(-1) - hist  # pixels below each level
    table = (step // 2 + before) // step.clamp(min=1)
    keep = ((hist > 0).sum(-1, keepdim=True) <= 1) | (step == 0)  # PIL leaves these channels alone
    table = torch.where(keep, torch.arange(256), table).clamp(0, 255)
    return _lut(x, table.to(torch.uint8))


def _blend(degenerate: Tensor, x: Tensor, factor: float) -> Tensor:
    """Image.blend(degenerate, x, factor) in float32, truncated to uint8 (PIL's ImagingBlend)."""
    a = torch.tensor(factor, dtype=torch.float32)
    d = degenerate.float()
    return (d + a * (x.float() - d)).clamp(0, 255).to(torch.uint8)  # to(uint8) truncates


def luma(x: Tensor) -> Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, as [1, ...] int32."""
    r, g, b = x.int().unbind(0)
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).unsqueeze(0)


def brightness(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def color(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Color: blend with the gray (L) image."""
    return _blend(luma(x).expand_as(x), x, factor)


def contrast(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Contrast: blend with each frame's mean gray level, rounded to an integer."""
    gray = _frames(luma(x)).double()  # [1, T, P]
    mean = (gray.mean(-1, keepdim=True) + 0.5).floor()  # [1, T, 1]
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, 1, 1)
    return _blend(mean.reshape(shape).expand_as(x), x, factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # ImageFilter.SMOOTH


def sharpness(x: Tensor, factor: float) -> Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border pixels kept, as PIL)."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x.clone()
    flat = x.reshape(-1, 1, h, w).float()  # [C*T, 1, H, W]
    smooth = F.conv2d(flat, _SMOOTH.view(1, 1, 3, 3)).add_(0.5).floor_().clamp_(0, 255)  # rounded
    degenerate = flat.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate.reshape(x.shape), x, factor)


# ----------------------------------------------------------------------------- geometry
def _lerp(v: list[Tensor], d: Tensor) -> Tensor:
    """PIL's BILINEAR: v0 + (v1 - v0) d."""
    return v[0] + (v[1] - v[0]) * d


def _cubic(v: list[Tensor], d: Tensor) -> Tensor:
    """PIL's BICUBIC (Geometry.c, cubic convolution with a = -1) through v[0..3] at offsets -1..2, at d."""
    p2 = v[2] - v[0]
    p3 = 2 * (v[0] - v[1]) + v[2] - v[3]
    p4 = -v[0] + v[1] - v[2] + v[3]
    return v[1] + d * (p2 + d * (p3 + d * p4))


def affine(x: Tensor, coeffs: tuple[float, ...], fill: tuple[int, ...], resample: str) -> Tensor:
    """Image.transform(size, AFFINE, coeffs, resample, fillcolor=fill) on uint8 x (bilinear or bicubic).

    Output pixel (col i, row j) reads the input at (a(i+.5) + b(j+.5) + c, d(i+.5) + e(j+.5) + f);
    where that lies outside the image it is `fill`. Neighbours past the edge repeat the edge, and
    the result is truncated to an integer, as PIL does. A clip's frames share the geometry.
    """
    h, w = x.shape[-2:]
    a, b, c, d, e, f = coeffs
    jj, ii = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                            torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    sx, sy = (a * ii + b * jj + c).reshape(-1, 1), (d * ii + e * jj + f).reshape(-1, 1)  # [H*W, 1] source
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    fx, fy = sx - 0.5, sy - 0.5
    x0, y0 = fx.floor(), fy.floor()
    dx, dy = fx - x0, fy - y0
    offsets, interp = ((0, 1), _lerp) if resample == "bilinear" else ((-1, 0, 1, 2), _cubic)
    cols = [(x0 + o).clamp(0, w - 1).long()[:, 0] for o in offsets]  # [H*W] each
    rows = [(y0 + o).clamp(0, h - 1).long()[:, 0] * w for o in offsets]
    pixels = x.reshape(-1, h * w).t().contiguous()  # [H*W, C*T]: one gather moves every channel and frame

    def at(row: Tensor, col: Tensor) -> Tensor:
        return pixels.index_select(0, row + col).double()  # [H*W, C*T]

    # double, as PIL: float32 is 3x faster but truncates a level the other way wherever the exact
    # value is an integer (1% of the pixels of a translation by 3.4 px)
    out = interp([interp([at(row, col) for col in cols], dx) for row in rows], dy).clamp(0, 255).floor()
    frames = pixels.shape[1] // x.shape[0]
    fill_t = torch.tensor(fill, dtype=torch.float64).repeat_interleave(frames)  # [C*T]
    out = torch.where(inside, out, fill_t).to(torch.uint8)  # PIL truncates
    return out.t().reshape(x.shape)


def rotate(x: Tensor, degrees: float, fill: tuple[int, ...], resample: str) -> Tensor:
    """Image.rotate(degrees) about the centre, same size: counter-clockwise for degrees > 0."""
    h, w = x.shape[-2:]
    t = -math.radians(degrees)
    cos, sin = round(math.cos(t), 15), round(math.sin(t), 15)
    a, b, d, e = cos, sin, -sin, cos
    cx, cy = w / 2.0, h / 2.0
    c = a * -cx + b * -cy + cx  # the inverse map keeps the centre fixed
    f = d * -cx + e * -cy + cy
    return affine(x, (a, b, c, d, e, f), fill, resample)


# ----------------------------------------------------------------------------- the policy
def _negate(v: float, gen: torch.Generator) -> float:
    """-v with probability 1/2 (timm's _randomly_negate)."""
    return -v if torch.rand((), generator=gen).item() > 0.5 else v


def _apply(name: str, x: Tensor, m: float, gen: torch.Generator, fill: tuple[int, ...],
           resample: str) -> Tensor:
    """One 'increasing' op of timm's RandAugment at magnitude m in [0, 10] (its level -> argument rule)."""
    level = m / LEVEL_MAX
    h, w = x.shape[-2:]
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = max(0.1, 1.0 + _negate(level * 0.9, gen))
        return {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}[name](
            x, factor)
    if name == "Rotate":
        return rotate(x, _negate(level * 30.0, gen), fill, resample)
    if name in ("ShearX", "ShearY"):
        s = _negate(level * 0.3, gen)
        return affine(x, (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0), fill, resample)
    if name in ("TranslateX", "TranslateY"):  # timm's TranslateXRel / TranslateYRel: up to 45% of the side
        pct = _negate(level * 0.45, gen)
        return affine(x, (1, 0, pct * w, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, pct * h),
                      fill, resample)
    if name == "Posterize":
        return posterize(x, 4 - int(level * 4))
    if name == "Solarize":
        return solarize(x, 256 - min(256, int(level * 256)))
    if name == "SolarizeAdd":
        return solarize_add(x, min(128, int(level * 110)))
    return {"AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert}[name](x)


OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
SPEC = re.compile(r"rand((?:-(?:m|n|mstd|p|inc)[0-9.]+)*)")


@dataclass(frozen=True)
class RandAugment:
    """`layers` ops drawn uniformly (with replacement) from OPS, each applied with probability `prob`
    at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]."""

    magnitude: float = 9.0  # 0..10
    layers: int = 2  # ops per sample
    magnitude_std: float = 0.5  # magnitude noise per op (0 = fixed)
    prob: float = 0.5  # chance each drawn op is applied

    @staticmethod
    def parse(spec: str) -> RandAugment:
        """timm's config string, e.g. "rand-m9-mstd0.5-inc1" (n: ops, m: magnitude, mstd: its noise,
        p: op probability; inc1 is required: only the 'increasing' variants are implemented)."""
        match = SPEC.fullmatch(spec)
        parts = dict(re.findall(r"-([a-z]+)([0-9.]+)", spec)) if match else {}
        if not match or parts.get("inc") not in ("1",):
            raise ValueError(f"{spec!r} is no RandAugment spec like rand-m9-mstd0.5-inc1 (inc1 required)")
        try:
            return RandAugment(magnitude=float(parts.get("m", LEVEL_MAX)), layers=int(parts.get("n", 2)),
                               magnitude_std=float(parts.get("mstd", 0.0)), prob=float(parts.get("p", 0.5)))
        except ValueError:
            raise ValueError(f"{spec!r}: a number is malformed") from None

    def __call__(self, x: Tensor, gen: torch.Generator, fill: tuple[int, ...] = (128, 128, 128),
                 resample: str = "bicubic") -> Tensor:
        """uint8 x: [C, H, W] or [C, T, H, W] -> the same, augmented."""
        picks = torch.randint(0, len(OPS), (self.layers,), generator=gen).tolist()
        for k in picks:
            if torch.rand((), generator=gen).item() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m += self.magnitude_std * torch.randn((), generator=gen).item()
            x = _apply(OPS[k], x, max(0.0, min(LEVEL_MAX, m)), gen, fill, resample)
        return x
