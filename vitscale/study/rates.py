"""The learning rate each trial trains at, from the sweep: the best rate at each length the sweep ran
(the shortest and the longest trial's, each at sweep_length of it), and between them a straight
line in log rate against log steps.

Under muP one rate carries across width and depth, but not across training length: the best rate
falls as a run gets longer (Bjorck et al. 2025, "Scaling optimal LR across token horizons"), and at
equal compute the study's smallest trials train several times longer than its largest. A trial of
T steps trains at the line's rate at T, held within the rates swept (beyond them the line is a
guess the sweep never checked). Each length's best is the grid's best rate, moved to the vertex of
the parabola in log rate through it and its two neighbours where it has both (the grid is a factor
of two apart; the vertex is held between the neighbours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitscale.study.results import SweepPoint


def pick_lr(points: list[SweepPoint]) -> SweepPoint:
    """The best sweep point: highest accuracy, then lowest loss (NaN runs never win)."""
    ok = [p for p in points if math.isfinite(p.accuracy)] or points
    return max(ok, key=lambda p: (p.accuracy, -(p.loss if p.loss is not None else math.inf)))


def best_rate(points: list[SweepPoint]) -> float:
    """One length's best rate: the grid's best, refined by the parabola through it and its neighbours."""
    grid = sorted((p for p in points if math.isfinite(p.accuracy)), key=lambda p: p.lr)
    best = pick_lr(points)
    i = next((k for k, p in enumerate(grid) if p.lr == best.lr), None)
    if i is None or i == 0 or i == len(grid) - 1:
        return best.lr
    x = np.log([grid[i - 1].lr, best.lr, grid[i + 1].lr])
    y = np.array([grid[i - 1].accuracy, best.accuracy, grid[i + 1].accuracy])
    a, b, _ = np.polyfit(x, y, 2)
    if a >= 0:  # no maximum between them (a tie): the grid's best
        return best.lr
    return float(np.exp(np.clip(-b / (2 * a), x[0], x[2])))


@dataclass(frozen=True)
class Rates:
    """The sweep's best rate at each length it ran; `at(steps)` the rate for a trial of that length."""

    steps: tuple[int, ...]  # the lengths swept, shortest first (one where every trial is as long)
    best: tuple[float, ...]  # the best base_lr at each
    low: float  # the rates swept: a trial's rate is held within them
    high: float

    def at(self, steps: int) -> float:
        if len(self.steps) == 1:
            return self.best[0]
        rate = self.best[0] * (steps / self.steps[0]) ** self.exponent
        return float(np.clip(rate, self.low, self.high))

    @property
    def exponent(self) -> float:
        """d log rate / d log steps between the lengths swept (0 with one length)."""
        if len(self.steps) == 1:
            return 0.0
        return float(np.log(self.best[-1] / self.best[0]) / np.log(self.steps[-1] / self.steps[0]))


def rates(points: list[SweepPoint]) -> Rates | None:
    """The Rates of a finished sweep (None: no sweep)."""
    if not points:
        return None
    lengths = sorted({p.steps for p in points})
    best = tuple(best_rate([p for p in points if p.steps == s]) for s in lengths)
    lrs = [p.lr for p in points]
    return Rates(tuple(lengths), best, min(lrs), max(lrs))
