"""The learning-rate sweep: the base model at each rate of study.lrs for a share of its budget (a
short wsd run, annealed, scored on validation), the grid extended past a best rate at its edge."""

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
from vitscale.study.results import Sizing, SweepPoint
from vitscale.study.trials import Trial, _same_hardware, metric, pick_lr, sized_run
from vitscale.train import engine

logger = logging.getLogger(__name__)


def run_sweep_lr(study: StudyConfig, base: Trial, sizing: Sizing, lr: float,
                 d: dist.Dist | None = None) -> SweepPoint:
    """One run of the learning-rate sweep: the base model at `lr` for sweep_length of its budget."""
    _same_hardware(study, f"the sweep's base at lr {lr:g}", sizing, base.run.train.device)
    steps = max(2, round(study.sweep_length * sizing.steps))
    run = replace(base.run, train=replace(base.run.train, base_lr=lr))
    cfg = sized_run(run, study, steps, sizing.steps_per_epoch, run.train.seed,
                 Path(study.out) / SWEEP / f"lr-{lr:g}", decay_frac=study.decay_frac, max_steps=steps)
    t0 = time.perf_counter()
    final = engine.train(cfg, d).metrics
    acc = float(final.get(metric(run), float("nan")))
    return SweepPoint(lr, steps, steps * run.train.batch * sizing.train_flops_per_sample, acc,
                      final.get("val_loss"), results.binomial_stderr(acc, sizing.val_samples),
                      time.perf_counter() - t0)


def sweep(study: StudyConfig, base: Trial, sizing: Sizing, runner: Launcher, d: dist.Dist,
           run: bool) -> list[SweepPoint]:
    """The learning-rate sweep on the base model (resumable; skipped when lrs is empty)."""
    if not study.lrs:
        return []
    points = read_sweep(study)
    if points is not None:
        return points
    path = Path(study.out) / SWEEP / SWEEP_RESULT
    if not run:
        raise UserError(f"the learning-rate sweep of {study.out!r} has not finished; run "
                         f"`vitscale study --config {Path(study.out) / 'study.yaml'} --trial {SWEEP}` first")
    got: dict[float, SweepPoint] = {}
    lrs = list(study.lrs)
    for _ in range(study.bracket + 1):  # a best rate at an edge of the grid extends it, as bracketing does
        jobs = [(f"sweep lr {lr:g}", run_sweep_lr, (study, base, sizing, lr, d),
                 Path(study.out) / SWEEP / f"lr-{lr:g}" / "log.txt") for lr in lrs if lr not in got]
        runner.map(jobs, lambda name, p: got.__setitem__(p.lr, p))
        grid = sorted(got)
        best = pick_lr([got[lr] for lr in grid]).lr
        if len(grid) < 3 or best not in (grid[0], grid[-1]):
            break
        lrs.append(float(f"{grid[0] ** 2 / grid[1] if best == grid[0] else grid[-1] ** 2 / grid[-2]:.3g}"))
    points = [got[lr] for lr in sorted(got)]
    if d.main:
        atomic_write_text(path, json.dumps([results.to_dict(p) for p in points], indent=2))
    best = pick_lr(points)
    logger.info("sweep: " + ", ".join(f"lr {p.lr:g} {100 * p.accuracy:.1f}%" for p in points)
                + f"; every trial trains at base_lr {best.lr:g}")
    if best.lr in (points[0].lr, points[-1].lr) and len(points) > 2:
        logger.warning(f"the best learning rate {best.lr:g} is at the edge of the sweep, extended "
                       f"{len(points) - len(study.lrs)} times (--bracket); widen --lrs")
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


