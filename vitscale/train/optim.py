"""Optimizers (AdamW; LARS for linear probes), parameter groups (weight decay, layer-wise LR
decay) and the LR schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from vitscale.common.errors import UserError
from vitscale.models.vit import ViT

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """Embeddings are layer 0, block i is layer i + 1, everything after is depth + 1.

    Only the encoder's `blocks` count; anything else (heads, decoders) is on top.
    """
    if {"patch_embed", "cls_token", "pos_embed"} & set(name.split(".")):
        return 0
    m = _BLOCK.search(name)
    if m and "decoder" not in name:
        return int(m.group(1)) + 1
    return depth + 1


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """Per-parameter LR multipliers of every ViT inside `model` (muP's; empty under SP)."""
    mults = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ViT):
            mults |= {f"{prefix}.{k}" if prefix else k: v for k, v in m.lr_multipliers().items()}
    return mults


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 depth: int = 0) -> list[dict]:
    """Trainable parameters grouped by (decay, layer, muP multiplier) with their LR scale.

    No weight decay on biases, norms (1-D tensors), tokens and position tables. With
    layer_decay < 1, layer l of an encoder of `depth` blocks gets LR x decay^(depth+1-l)
    (BEiT / MAE fine-tuning). A muP model's hidden matrices get LR x their multiplier
    (`ViT.lr_multipliers`) and weight decay / multiplier, so that AdamW's per-step decay
    lr x wd stays that of the base (the `mup` package's MuAdamW default).
    """
    mults = lr_multipliers(model)
    groups: dict[tuple[bool, int, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(NO_DECAY_NAMES)
        layer = layer_id(name, depth) if layer_decay != 1.0 else 0
        mult = mults.get(name, 1.0)
        key = (decay, layer, mult)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay != 1.0 else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay / mult if decay else 0.0,
                           "lr_scale": scale * mult}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


OPTIMIZERS = ("adamw", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017), the optimizer
    of MAE's linear probe. For a matrix p with gradient g the step direction is u = g + wd p,
    rescaled to eta ||p|| / ||u|| of its size where both norms are positive; vectors (biases,
    norms) take g alone. Then mu = momentum mu + u and p -= lr mu."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    u = u * trust
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(u)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build(name: str, groups: list[dict], betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The run's optimizer over `groups` (LR set per step by set_lr): AdamW, or LARS with
    momentum betas[0]."""
    if name == "lars":
        return LARS(groups, momentum=betas[0])
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=True)  # fused: 2x+ faster step on CPU


SCHEDULES = ("cosine", "wsd")


def decay_start(total: int, decay_frac: float) -> int:
    """First optimizer step of a warmup-stable-decay run's decay: its last round(decay_frac x total)
    steps decay. A cooldown branch of length `total` starts from the stable run's checkpoint here."""
    return total - round(decay_frac * total)


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float, schedule: str = "cosine",
          decay_frac: float = 0.2) -> float:
    """The LR of optimizer step `step` (0-based) of a run of `total` steps.

    Both schedules warm up linearly to `peak` over `warmup` steps. "cosine" then follows half
    a cosine down to `floor` at `total`. "wsd" (warmup-stable-decay; Zhai et al. 2022, Hägele
    et al. 2024) stays at `peak`, then over its last round(decay_frac x total) steps falls as
    1 - sqrt(progress) to `floor`: progress is 1/decay on the first decay step (LR just below
    peak) and 1 on the last (LR = floor). The LR before decay_start(total, ...) does not depend
    on `total`, so a wsd run of any length is its stable run's prefix plus its own decay.
    Warm-up wins where the two overlap (a decay longer than the steps after warm-up).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        start = decay_start(total, decay_frac)
        if step < start:
            return peak
        progress = (step - start + 1) / (total - start)
        return floor + (peak - floor) * (1.0 - math.sqrt(min(1.0, progress)))
    if schedule != "cosine":
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
