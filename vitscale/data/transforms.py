"""Image and clip transforms in plain torch, driven by an explicit generator.

Tensors are ``[C, H, W]`` images or ``[C, T, H, W]`` clips, uint8 or float in [0, 1]. A clip
gets one crop and one flip for all its frames. Random choices come only from the
`torch.Generator` passed in (never the global RNG); ``gen=None`` means eval: center crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from vitscale.data.common import as_float
from vitscale.data.views import View

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def random_resized_crop_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                            gen: torch.Generator) -> Box:
    """A crop of random area share in `scale` and aspect (w/h) in `ratio`, as Inception / torchvision.

    Ten tries at a box that fits; otherwise the largest centered box with a clamped aspect.
    With scale (1, 1) no smaller box fits (up to rounding): that box, with nothing drawn.
    """
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10 if scale[0] < 1.0 else 0):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h: int, w: int, crop: float) -> Box:
    """The centered square of side `crop` x the shorter side (resize-then-center-crop in one step)."""
    side = max(1, round(min(h, w) * crop))
    return (h - side) // 2, (w - side) // 2, side, side


def resized_crop(x: Tensor, box: Box, size: int) -> Tensor:
    """Crop `box` from every frame and resize it to size x size (bilinear, antialiased)."""
    top, left, ch, cw = box
    x = as_float(x[..., top : top + ch, left : left + cw])
    if (ch, cw) == (size, size):
        return x.contiguous()
    lead = x.shape[:-2]  # (C,) or (C, T)
    flat = x.reshape(1, -1, ch, cw)  # [1, C*T, h, w]: frames share one interpolation call
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=ch > size or cw > size)
    return out.reshape(*lead, size, size)  # [C, (T,) size, size]


def hflip(x: Tensor) -> Tensor:
    """Mirror left-right (last axis), the same for every frame."""
    return x.flip(-1)


@cache
def _per_channel(values: tuple[float, ...], ndim: int, dtype: torch.dtype) -> Tensor:
    """values as a [C, 1, ...] tensor of `ndim` dims; cached (a tensor per item costs more than the item)."""
    return torch.tensor(values, dtype=dtype).view((-1,) + (1,) * (ndim - 1))


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel; channels are the first axis of [C, H, W] or [C, T, H, W]."""
    return (x - _per_channel(mean, x.ndim, x.dtype)).div_(_per_channel(std, x.ndim, x.dtype))


@dataclass(frozen=True)
class ClipTransform:
    """Train: random resized crop + optional flip. Eval (gen=None): center crop. Then normalize."""

    size: int  # output side in pixels
    mean: tuple[float, ...]  # per-channel mean
    std: tuple[float, ...]  # per-channel std
    scale: tuple[float, float] = (0.35, 1.0)  # crop area share range (train)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect range (train)
    flip: bool = False  # random horizontal flip (train)
    eval_crop: float = 1.0  # center crop share of the shorter side (eval)

    def __call__(self, x: Tensor, gen: torch.Generator | View | None) -> Tensor:
        """x: [C, H, W] or [C, T, H, W] -> normalized float32 of the same rank at size x size."""
        h, w = x.shape[-2:]
        if gen is None or isinstance(gen, View):  # eval: the center crop, or a test view's crop
            box = center_crop_box(h, w, self.eval_crop) if gen is None else gen.box(h, w, self.eval_crop)
            return normalize(resized_crop(x, box, self.size), self.mean, self.std)
        x = resized_crop(x, random_resized_crop_box(h, w, self.scale, self.ratio, gen), self.size)
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            x = hflip(x)
        return normalize(x, self.mean, self.std)

    def source_side(self, train: bool) -> int:
        """Shorter side a decoder must keep so that no crop has to be upsampled much."""
        share = self.scale[0] if train else self.eval_crop**2
        return math.ceil(self.size / math.sqrt(share))
