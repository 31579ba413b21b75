"""Multi-resolution training (ResFormer, Tian et al. 2023): each optimizer step trains at one
of several input sides, so the model can be evaluated at any of them and between them.

The side of step s is a pure function of (seed, s) (a resume replays it exactly): steps come
in cycles of len(sides), each cycle a seeded permutation of the sides, so every side gets the
same share of steps. The data loader still yields the data's size; the batch is resized on
its device (bilinear, antialiased when shrinking, as PIL), so the sampler, the augmentations
and the data's RNG are those of a single-resolution run. The ViT resamples its position
embedding to the batch's grid (ViT.pos_embed_for).
"""

from __future__ import annotations

import random

import torch.nn.functional as F
from torch import Tensor


def side_at(sides: tuple[int, ...], seed: int, step: int) -> int:
    """The input side of optimizer step `step` (0-based) of a run seeded `seed`."""
    cycle, index = divmod(step, len(sides))
    order = random.Random(seed * 2**32 + cycle).sample(range(len(sides)), len(sides))
    return sides[order[index]]


def resize(x: Tensor, size: int | tuple[int, int], mode: str = "bilinear",
           antialias: bool | None = None) -> Tensor:
    """[..., H, W] images (or clips) -> [..., h, w] (`size` a side or (h, w)); the same tensor if
    already that size. Antialiased when it shrinks both sides, unless `antialias` says."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    shrinking = hw[0] < x.shape[-2] and hw[1] < x.shape[-1]  # in both directions
    flat = x.reshape(-1, 1, *x.shape[-2:])  # [B*C(*T), 1, H, W]
    out = F.interpolate(flat.float(), size=hw, mode=mode, align_corners=False,
                        antialias=shrinking if antialias is None else antialias)
    return out.reshape(*x.shape[:-2], *hw).to(x.dtype)
