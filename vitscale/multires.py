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


def resize(x: Tensor, side: int) -> Tensor:
    """[..., H, W] images (or clips) -> [..., side, side]; the same tensor if already that size."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    flat = x.reshape(-1, 1, *x.shape[-2:])  # [B*C(*T), 1, H, W]
    out = F.interpolate(flat.float(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=side < min(x.shape[-2:]))
    return out.reshape(*x.shape[:-2], side, side).to(x.dtype)
