"""The learning-rate sweep: the base model at each rate of study.lrs for sweep_length of the shortest
and of the longest trial's steps (short wsd runs, annealed, scored on validation), the grid extended
past a best rate at its edge; rates.py turns it into each trial's rate by its length."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from vitscale.common import dist
from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text
from vitscale.study import results
from vitscale.study.config import SWEEP, SWEEP_RESULT, StudyConfig
from vitscale.study.launch import Launcher
from vitscale.study.rates import pick_lr, rates
from vitscale.study.results import Sizing, SweepPoint
from vitscale.study.trials import Trial, _same_hardware, metric, sized_run
from vitscale.train import engine

logger = logging.getLogger(__name__)


def lengths(study: StudyConfig, sizes: list[Sizing]) -> tuple[int, ...]:
    """The sweep's lengths: sweep_length of the shortest and of the longest trial's steps (one where
    every trial is as long), at least two steps each."""
    steps = [s.steps for s in sizes]
    return tuple(sorted({max(2, round(study.sweep_length * n)) for n in (min(steps), max(steps))}))


def _dir(study: StudyConfig, lr: float, steps: int, one: bool) -> Path:
    return Path(study.out) / SWEEP / (f"lr-{lr:g}" if one else f"lr-{lr:g}-{steps}")


def run_sweep_lr(study: StudyConfig, base: Trial, sizing: Sizing, lr: float, steps: int, one: bool = True,
                 d: dist.Dist | None = None) -> SweepPoint:
    """One run of the learning-rate sweep: the base model at `lr` for `steps` steps (a wsd run whose
    warm-up is its own length's share, as a trial of that length has). `one`: the sweep has one
    length (its runs' folders are lr-RATE, else lr-RATE-STEPS)."""
    _same_hardware(study, f"the sweep's base at lr {lr:g}", sizing, base.run.train.device)
    run = replace(base.run, train=replace(base.run.train, base_lr=lr))
    cfg = sized_run(run, study, steps, sizing.steps_per_epoch, run.train.seed, _dir(study, lr, steps, one),
                    decay_frac=study.decay_frac, max_steps=steps)
    t0 = time.perf_counter()
    final = engine.train(cfg, d).metrics
    acc = float(final.get(metric(run), float("nan")))
    return SweepPoint(lr, steps, steps * run.train.batch * sizing.train_flops_per_sample, acc,
                      final.get("val_loss"), results.binomial_stderr(acc, sizing.val_samples),
                      time.perf_counter() - t0)


def sweep(study: StudyConfig, base: Trial, sizing: Sizing, runner: Launcher, d: dist.Dist,
          run: bool, steps: tuple[int, ...] = ()) -> list[SweepPoint]:
    """The learning-rate sweep on the base model at each of `steps` (`lengths`; resumable; skipped
    when lrs is empty). A best rate at an edge of the grid, at any length, extends the grid there
    (at every length), as bracketing extends a family's sizes."""
    if not study.lrs:
        return []
    points = read_sweep(study)
    if points is not None:
        return points
    path = Path(study.out) / SWEEP / SWEEP_RESULT
    if not run:
        raise UserError(f"the learning-rate sweep of {study.out!r} has not finished; run "
                         f"`vitscale study --config {Path(study.out) / 'study.yaml'} --trial {SWEEP}` first")
    steps = steps or (max(2, round(study.sweep_length * sizing.steps)),)
    one = len(steps) == 1
    got: dict[tuple[float, int], SweepPoint] = {}
    lrs = list(study.lrs)
    for _ in range(study.bracket + 1):
        jobs = [(f"sweep lr {lr:g} for {n} steps", run_sweep_lr, (study, base, sizing, lr, n, one, d),
                 _dir(study, lr, n, one) / "log.txt") for n in steps for lr in lrs if (lr, n) not in got]
        runner.map(jobs, lambda name, p: got.__setitem__((p.lr, p.steps), p))
        grid = sorted({lr for lr, _ in got})
        edges = {pick_lr([p for (_, n), p in got.items() if n == m]).lr for m in steps} & {grid[0], grid[-1]}
        if len(grid) < 3 or not edges:
            break
        lrs += [float(f"{grid[0] ** 2 / grid[1]:.3g}")] * (grid[0] in edges)
        lrs += [float(f"{grid[-1] ** 2 / grid[-2]:.3g}")] * (grid[-1] in edges)
    points = [got[k] for k in sorted(got, key=lambda k: (k[1], k[0]))]
    if d.main:
        atomic_write_text(path, json.dumps([results.to_dict(p) for p in points], indent=2))
    found = rates(points)
    for n, lr in zip(found.steps, found.best, strict=True):
        logger.info(f"sweep at {n} steps: " + ", ".join(f"lr {p.lr:g} {100 * p.accuracy:.1f}%"
                                                        for p in points if p.steps == n) + f"; best {lr:.3g}")
    logger.info(f"every trial trains at base_lr {found.best[0]:.3g}" if one else
                f"each trial trains at the rate for its own steps on the line through these (rate ~ "
                f"steps^{found.exponent:.2f}), held within the rates swept")
    grid = sorted({p.lr for p in points})
    for n in steps:
        best = pick_lr([p for p in points if p.steps == n]).lr
        if best in (grid[0], grid[-1]) and len(grid) > 2:
            logger.warning(f"the best learning rate at {n} steps, {best:g}, is at the edge of the sweep, "
                           f"extended {len(grid) - len(study.lrs)} times (--bracket); widen --lrs")
    return points


def read_sweep(study: StudyConfig) -> list[SweepPoint] | None:
    """The finished learning-rate sweep (sweep.json), [] with no lrs, None if not finished."""
    if not study.lrs:
        return []
    path = Path(study.out) / SWEEP / SWEEP_RESULT
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            points = [results.from_dict(SweepPoint, p, str(path)) for p in saved]
            if set(study.lrs) <= {p.lr for p in points}:  # with any rates an edge added
                return points
        except (OSError, ValueError, TypeError) as e:  # StaleResult, a cut file, not a list of records
            logger.warning(f"{path} cannot be read ({e}); running the sweep again (its runs resume)")
    return None


