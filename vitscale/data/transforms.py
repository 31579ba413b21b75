"""Image and clip transforms in plain torch, driven by an explicit generator.

Tensors are ``[C, H, W]`` images or ``[C, T, H, W]`` clips, uint8 or float in [0, 1]. A clip
gets one crop, one flip, one RandAugment draw, one colour jitter and one erased box for all its
frames. Random choices come only from the `torch.Generator` passed in (never the global RNG);
``gen=None`` means eval: center crop, no augmentation.

The training order is timm's (DeiT, MAE fine-tuning): random resized crop, flip, RandAugment
(on 8-bit pixels, as PIL) or else colour jitter, normalize, random erasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from vitscale.data.common import as_float
from vitscale.data.randaugment import RandAugment
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


def resized_crop(x: Tensor, box: Box, size: int, mode: str = "bilinear") -> Tensor:
    """Crop `box` from every frame and resize it to size x size, antialiased when shrinking.

    mode "bicubic" is PIL's resize: its a = -0.5 kernel, which torch's antialiased path shares (also
    when enlarging), clamped to [0, 1] as PIL's 8-bit output is. (An 8-bit PIL image is also rounded
    between its width and height passes, and recent Pillow picks their order by cost: up to a level.)
    """
    top, left, ch, cw = box
    x = as_float(x[..., top : top + ch, left : left + cw])
    if (ch, cw) == (size, size):
        return x.contiguous()
    lead = x.shape[:-2]  # (C,) or (C, T)
    flat = x.reshape(1, -1, ch, cw)  # [1, C*T, h, w]: frames share one interpolation call
    if mode == "bicubic":
        out = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out = out.clamp_(0.0, 1.0)
    else:
        out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=ch > size or cw > size)
    return out.reshape(*lead, size, size)  # [C, (T,) size, size]


def hflip(x: Tensor) -> Tensor:
    """Mirror left-right (last axis), the same for every frame."""
    return x.flip(-1)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma of float RGB [3, ...] -> [1, ...] (torchvision's rgb_to_grayscale weights)."""
    return (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def color_jitter(x: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """torchvision's ColorJitter(strength, strength, strength) on float RGB in [0, 1]: brightness,
    contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], applied in a random order;
    each blends x with black, the frame's mean gray, or the gray image, and clamps to [0, 1]."""
    factors = [_uniform(gen, max(0.0, 1.0 - strength), 1.0 + strength) for _ in range(3)]
    for k in torch.randperm(3, generator=gen).tolist():
        f = factors[k]
        if k == 0:
            x = (x * f).clamp_(0, 1)
        elif k == 1:
            gray = _gray(x)
            mean = gray.mean((-2, -1), keepdim=True)  # [1, (T,) 1, 1]: each frame's own
            x = (f * x + (1 - f) * mean).clamp_(0, 1)
        else:
            x = (f * x + (1 - f) * _gray(x)).clamp_(0, 1)
    return x


def erase_box(h: int, w: int, gen: torch.Generator, area: tuple[float, float] = (0.02, 1 / 3),
              log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> Box | None:
    """timm's RandomErasing box: area share uniform in `area`, aspect (h/w) log-uniform; ten tries
    at one that fits strictly inside, else None (nothing erased)."""
    for _ in range(10):
        target = _uniform(gen, *area) * h * w
        aspect = math.exp(_uniform(gen, *log_ratio))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if ew < w and eh < h:
            top = int(torch.randint(0, h - eh + 1, (), generator=gen))
            left = int(torch.randint(0, w - ew + 1, (), generator=gen))
            return top, left, eh, ew
    return None


def random_erase(x: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    """With probability `prob`, one `erase_box` of every frame of normalized x gets N(0, 1) noise
    per pixel (timm's mode 'pixel'); x is changed in place and returned."""
    if torch.rand((), generator=gen).item() >= prob:
        return x
    box = erase_box(*x.shape[-2:], gen)
    if box is not None:
        top, left, eh, ew = box
        patch = x[..., top : top + eh, left : left + ew]
        patch.copy_(torch.randn(patch.shape, generator=gen, dtype=x.dtype))
    return x


def to_uint8(x: Tensor) -> Tensor:
    """Float in [0, 1] -> uint8 levels (rounded), as a PIL image holds them."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


@cache
def _per_channel(values: tuple[float, ...], ndim: int, dtype: torch.dtype) -> Tensor:
    """values as a [C, 1, ...] tensor of `ndim` dims; cached (a tensor per item costs more than the item)."""
    return torch.tensor(values, dtype=dtype).view((-1,) + (1,) * (ndim - 1))


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel; channels are the first axis of [C, H, W] or [C, T, H, W]."""
    return (x - _per_channel(mean, x.ndim, x.dtype)).div_(_per_channel(std, x.ndim, x.dtype))


@dataclass(frozen=True)
class ClipTransform:
    """Train: random resized crop, flip, RandAugment or colour jitter, normalize, random erasing.
    Eval (gen=None): center crop, normalize."""

    size: int  # output side in pixels
    mean: tuple[float, ...]  # per-channel mean
    std: tuple[float, ...]  # per-channel std
    scale: tuple[float, float] = (0.35, 1.0)  # crop area share range (train)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect range (train)
    flip: bool = False  # random horizontal flip (train)
    eval_crop: float = 1.0  # center crop share of the shorter side (eval)
    interpolation: str = "bilinear"  # crop resize (train and eval) and RandAugment geometry: or "bicubic"
    randaugment: RandAugment | None = None  # RandAugment policy (train); None = off
    color_jitter: float = 0.0  # brightness / contrast / saturation strength (train); unused with randaugment
    erase_prob: float = 0.0  # random erasing probability (train)

    def __call__(self, x: Tensor, gen: torch.Generator | View | None) -> Tensor:
        """x: [C, H, W] or [C, T, H, W] -> normalized float32 of the same rank at size x size."""
        h, w = x.shape[-2:]
        if gen is None or isinstance(gen, View):  # eval: the center crop, or a test view's crop
            box = center_crop_box(h, w, self.eval_crop) if gen is None else gen.box(h, w, self.eval_crop)
            return normalize(resized_crop(x, box, self.size, self.interpolation), self.mean, self.std)
        box = random_resized_crop_box(h, w, self.scale, self.ratio, gen)
        x = resized_crop(x, box, self.size, self.interpolation)
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            x = hflip(x)
        if self.randaugment is not None:  # timm: RandAugment replaces colour jitter
            fill = tuple(round(255 * m) for m in self.mean)  # out-of-image pixels: the mean colour
            x = as_float(self.randaugment(to_uint8(x), gen, fill, self.interpolation))
        elif self.color_jitter > 0:
            x = color_jitter(x, self.color_jitter, gen)
        x = normalize(x, self.mean, self.std)
        return random_erase(x, self.erase_prob, gen) if self.erase_prob > 0 else x

    def fixed(self, train: bool) -> bool:
        """Whether this transform gives every item the same crop and draws nothing at random: eval,
        or train with whole-image crops (scale from 1) and no flip, RandAugment, colour jitter or
        erasing. Such items can be transformed as one batch (`batch`)."""
        return not train or (self.scale[0] >= 1.0 and not self.flip and self.randaugment is None
                             and self.color_jitter <= 0 and self.erase_prob <= 0)

    def batch(self, x: Tensor, train: bool) -> Tensor:
        """`fixed` items [B, C, (T,) H, W] at once: what calling this on each item gives (the same
        elementwise steps, so the same bits), for train (gen drawing nothing) or eval."""
        h, w = x.shape[-2:]
        box = random_resized_crop_box(h, w, self.scale, self.ratio, None) if train else \
            center_crop_box(h, w, self.eval_crop)
        out = resized_crop(x.transpose(0, 1), box, self.size, self.interpolation)  # batch as frames
        return normalize(out, self.mean, self.std).transpose(0, 1).contiguous()

    def source_side(self, train: bool) -> int:
        """Shorter side a decoder must keep so that no crop has to be upsampled much."""
        share = self.scale[0] if train else self.eval_crop**2
        return math.ceil(self.size / math.sqrt(share))
