"""The counted cost of a training step: the multiply-adds one step (forward and backward) spends per
sample as its task module trains, token dropping and every input side of train.resolutions included,
as PyTorch's FlopCounterMode counts them on meta tensors (vitscale.cost.counted counts a bare model)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitscale import tasks
from vitscale.cost.measure import example_input
from vitscale.train.config import RunConfig


def sample_shapes(run: RunConfig) -> dict[tuple[int, int | tuple[int, int]], float]:
    """{(frames, side): share of the training samples seen at that input shape} (as plan.Plan.shares
    has them): the data's alone, or with train.resolutions an equal share at each side (every side
    trains as many steps of one batch; multires.side_at)."""
    sides = run.train.resolutions
    if not sides:
        h, w = run.model.hw
        return {(run.model.frames, h if h == w else (h, w)): 1.0}
    return {(run.model.frames, s): 1.0 / len(sides) for s in sides}


def train_flops_per_sample(run: RunConfig, num_classes: int,
                           shapes: dict[tuple[int, int | tuple[int, int]], float] | None = None) -> float:
    """Multiply-adds of one training step (forward + backward) per sample, counted by
    PyTorch's FlopCounterMode on meta tensors (bias additions not included), as the module
    trains (token dropping included): the mean over `shapes`, {(frames, side or (h, w)): share
    of the samples} (default: sample_shapes, the data's shape or train.resolutions')."""
    batch = 2
    total = 0.0
    with torch.device("meta"):
        train = replace(run.train, mixup=0, cutmix=0)
        plain = replace(run, model=run.model.replace(drop_path=0.0), train=train)
        module = tasks.build(plain, num_classes)
        y = torch.zeros(batch, dtype=torch.long)
    for (frames, side), share in (shapes or sample_shapes(run)).items():
        x = example_input(run.model.replace(frames=frames, image_size=side), batch, "meta")
        with FlopCounterMode(display=False) as counter:
            module(x, y).backward()
        total += share * counter.get_total_flops() / 2 / batch
    return total
