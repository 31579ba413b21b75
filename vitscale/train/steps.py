"""The shape of every optimizer step of a run: how many samples it takes, at how many frames and
which side, and where in which epoch it starts. For most runs every step is alike; two recipes
vary it, each a pure function of the config (a resume replays it exactly):

- Multi-resolution training (ResFormer; train.resolutions): the batch keeps its size, its side
  is drawn per step (multires.side_at).
- Multigrid training (Wu et al. 2020; train.multigrid = long and/or short): coarse steps take
  more samples at fewer frames and a smaller side, so that every step costs about as much as
  a base step (batch x frames x side² about constant) and an epoch of coarse steps is cheap.
  * long cycle: the run passes through four base shapes, (frames, side) x (1/4, 1/√2),
    (1/2, 1/√2), (1/2, 1), (1, 1), batch x 8, 4, 2, 1, then a last stage at the data's shape;
    each stage gets about the same number of steps, so its share of epochs is proportional
    to its samples per step. The LR scales with the stage's batch multiple (linear scaling,
    as the engine's base_lr x batch / 256 and PySlowFast's multigrid).
  * short cycle: within a stage, steps cycle through the side x 1/2 and x 1/√2 of the
    data's side (batch x 4 and x 2 relative to the stage's) and the stage's own shape. The
    LR does not follow the short cycle.
  An epoch is still one pass over the training set: steps take consecutive keys of the
  epoch's EpochSampler order; an epoch's last step takes the whole base batches left (fewer
  samples at its shape), so an epoch reads exactly the keys a plain run's epoch reads.
  Frames are sub-sampled evenly from the loaded clip (the same time span, a larger stride)
  and sides resized on the device (multires.resize), so data loading, its RNG and
  augmentation stay those of a plain run.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from vitscale.common.errors import UserError
from vitscale.data.multires import resize, side_at

LONG = ((0.25, 2**-0.5), (0.5, 2**-0.5), (0.5, 1.0), (1.0, 1.0))  # (frames, side) factors
SHORT = (0.5, 2**-0.5)  # side factors of a short cycle's first two steps (of the data's side)
CYCLES = ("long", "short")


@dataclass(frozen=True)
class Shape:
    mult: int  # samples per step as a multiple of train.batch
    frames: int
    side: int
    lr_mult: float = 1.0  # the LR's multiple (the long cycle's batch multiple)


def _round_to(x: float, unit: int) -> int:
    return max(unit, unit * round(x / unit))


def multigrid_stages(cycles: tuple[str, ...], frames: int, side: int, tubelet: int,
                     patch: int) -> list[list[Shape]]:
    """Each stage's short cycle of shapes (one shape without the short cycle), coarsest stage
    first; frames and sides rounded to whole tubelets and patches."""
    def shape(t: int, s: int, lr_mult: float = 1.0) -> Shape:
        return Shape(max(1, round(frames * side**2 / (t * s**2))), t, s, lr_mult)

    long = [(_round_to(frames * ft, tubelet) if frames > 1 else 1, _round_to(side * fs, patch))
            for ft, fs in LONG] if "long" in cycles else [(frames, side)]
    stages = []
    for t, s in long:
        lr_mult = shape(t, s).mult if "long" in cycles else 1.0
        sides = [_round_to(side * f, patch) for f in SHORT] + [s] if "short" in cycles else [s]
        stages.append([shape(t, x, lr_mult) for x in sides])
    if "long" in cycles:
        stages.append([shape(frames, side)])  # the last stage: the data's own shape
    return stages


class Plan:
    """Every optimizer step of a run: its Shape and its place in an epoch.

    `per_rank`: keys one rank reads in an epoch (EpochSampler's length); `per_step`: keys one rank
    reads in a step of multiple 1 (micro-batch x accumulation)."""

    def __init__(self, train, frames: int, side: int, tubelet: int, patch: int, per_rank: int,
                 per_step: int):
        self.train, self.per_rank, self.per_step = train, per_rank, per_step
        cycles = tuple(train.multigrid)
        self.stages = multigrid_stages(cycles, frames, side, tubelet, patch) if cycles else [
            [Shape(1, frames, side)]]
        weights = [sum(s.mult for s in stage) / len(stage) for stage in self.stages]  # samples per step
        total = sum(weights)
        self.bounds = [train.epochs * sum(weights[: k + 1]) / total for k in range(len(weights))]
        starts, offsets, shapes = [0], [], []  # step -> (epoch via starts, key offset, shape)
        for epoch in range(train.epochs):
            offset, j = 0, 0
            while True:
                stage = self.stages[min(bisect.bisect_right(self.bounds, epoch + offset / per_rank),
                                        len(self.stages) - 1)]
                shape = stage[j % len(stage)]
                fits = (per_rank - offset) // per_step  # whole base batches left in the epoch
                if fits < shape.mult:  # the epoch's last step takes what is left, at its shape
                    if not fits:
                        break
                    shape = replace(shape, mult=fits)
                offsets.append(offset)
                shapes.append(shape)
                offset, j = offset + per_step * shape.mult, j + 1
            starts.append(len(offsets))
        if not offsets:
            raise UserError("an epoch is shorter than one step; lower --train.batch")
        self.starts, self.offsets, self.shapes = starts, offsets, shapes
        self.total = min(train.max_steps, len(offsets)) if train.max_steps else len(offsets)

    # --------------------------------------------------------------- where a step is
    def epoch(self, step: int) -> int:
        """The epoch (0-based) step `step` belongs to (the last for step = the total)."""
        return min(bisect.bisect_right(self.starts, step) - 1, len(self.starts) - 2)

    def offset(self, step: int) -> int:
        """Keys this rank has read in the step's epoch before it (a step of the run: < total)."""
        return self.offsets[step]

    def epoch_end(self, step: int) -> int:
        """The first step of the next epoch, for a step in this one."""
        return self.starts[self.epoch(step) + 1]

    def ends_epoch(self, step: int) -> bool:
        """Whether `step` steps done is the end of an epoch (or of the run)."""
        return step == self.total or step in self.starts[1:]

    def epochs_done(self, step: int) -> float:
        """Epochs done after `step` steps (fractional within an epoch, by its steps)."""
        e = self.epoch(max(step - 1, 0))
        n = self.starts[e + 1] - self.starts[e]
        return (e * n + step - self.starts[e]) / n  # step / n exactly when every epoch has n steps

    def batches(self, step: int, end: int, micro: int, accum: int) -> list[int]:
        """Micro-batch sizes of steps [step, end) of one epoch, `accum` per step."""
        return [micro * s.mult for s in self.shapes[step:end] for _ in range(accum)]

    # --------------------------------------------------------------- what a step does
    def shape(self, step: int) -> Shape:
        t = self.train
        if t.resolutions:  # multi-resolution: the batch keeps its shape, the side is drawn per step
            base = self.shapes[step]
            return Shape(1, base.frames, side_at(t.resolutions, t.seed, step))
        return self.shapes[step]

    def warmup(self) -> int:
        """Warm-up steps: those of the first train.warmup_epochs epochs."""
        w = self.train.warmup_epochs
        e = math.floor(w)
        if e >= self.train.epochs:  # past the run: at its last epoch's rate
            n = self.starts[-1] - self.starts[-2]
            return self.starts[-1] + round((w - self.train.epochs) * n)
        return self.starts[e] + round((w - e) * (self.starts[e + 1] - self.starts[e]))

    def shares(self) -> dict[tuple[int, int], float]:
        """{(frames, side): share of the run's training samples seen at that shape}."""
        seen = Counter()
        for step in range(self.total):
            s = self.shape(step)
            seen[(s.frames, s.side)] += s.mult
        total = sum(seen.values())
        return {k: v / total for k, v in sorted(seen.items())}


def reshape(x: Tensor, frames: int, side: int) -> Tensor:
    """A batch [B, C, H, W] or [B, C, T, H, W] at `frames` (evenly spaced frames of the clip:
    the same span, a larger stride) and `side` (multires.resize)."""
    if x.ndim == 5 and x.shape[2] != frames:
        t = x.shape[2]
        x = x.index_select(2, torch.arange(frames, device=x.device) * t // frames)
    return resize(x, side)
