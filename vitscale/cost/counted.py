"""Counted cost: the multiply-adds a model, or a task's training step, really executes, as
PyTorch's FlopCounterMode counts them on meta tensors (no data, no time; bias additions not
included). vitscale.cost.complexity is the analytic count from a config alone and the tests tie the two;
this module counts what a formula does not cover: a task's whole step (the MAE decoder, a
distillation teacher, dropped tokens) and the input shapes a run trains at.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitscale.cost.measure import example_input
from vitscale.models.vit import ViT, ViTConfig


def macs_per_sample(cfg: ViTConfig, mode: str) -> float:
    """Multiply-adds of one sample's inference, or of its training step (forward + backward), as
    FlopCounterMode counts them on meta tensors (no recomputation: the model's own flops)."""
    batch = 2
    with torch.device("meta"):
        model = ViT(cfg).train(mode == "train")
        x = example_input(cfg, batch, "meta")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            model(x).float().mean().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / 2 / batch


