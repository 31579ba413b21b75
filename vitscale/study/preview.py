"""What a study will do, before it runs (`vitscale study --plan`), and what it has done so far
(`vitscale study --collect`), without training anything.

The plan counts training compute the way the study spends it (study.branches): a trial seed
runs its stable phase up to the last branch point, then each cooldown branch from its branch
point to its end; seeds after the first run the full-length cooldown only; every sweep run is
a whole short wsd run of the base. Under a time budget the steps come from a throughput
measured when the study runs (trial.json), so they are "measured when run" unless a trial's
sizing is already recorded in the study directory. Time is estimated the same way: training
samples over the samples/s a trial's sizing measured, so it is known once the trials are sized
(the study's first phase: `--plan` again after it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vitscale.common import dist, errors, lock, records, rundir
from vitscale.common.errors import UserError
from vitscale.cost.complexity import cost
from vitscale.data import build_datasets
from vitscale.study import analysis, config, results, runner, verify
from vitscale.study import sweep as sweeps
from vitscale.study.rates import rates
from vitscale.study.results import SeedResult, Sizing
from vitscale.study.trials import (
    Trial,
    _base,
    branches,
    held_out,
    plan,
    reference_compute,
    steps_for,
    trial_dir,
)
from vitscale.train.flops import train_flops_per_sample

logger = logging.getLogger(__name__)

MEASURED = "measured when run"


def _recorded(cfg: config.StudyConfig, trial: Trial) -> Sizing | None:
    """A trial's sizing as an earlier run of this study recorded it (trial.json), if whole."""
    return results.finished(trial_dir(cfg, trial) / config.TRIAL, Sizing, f"shown as {MEASURED}")


@dataclass(frozen=True)
class PlannedTrial:
    """One trial as the plan sees it: its shape, its cost per sample, and its length and compute
    where the budget fixes them before it runs (None where a time budget waits on a measurement).
    `--plan --json` writes these fields, in this order, for each trial."""

    name: str
    strategies: tuple[str, ...]
    factor: float  # the flops factor asked for
    achieved: float  # the flops factor reached
    depth: int
    width: int
    heads: int
    patch: int
    side: int  # input side in pixels
    frames: int
    params: int
    flops: float  # forward multiply-adds per sample
    train_flops_per_sample: float  # forward + backward
    batch: int
    steps_per_epoch: int
    steps: int | None  # of the full budget
    steps_from: str  # what fixed the steps: the budget, trial.json, or MEASURED (not yet)
    compute: float | None  # training multiply-adds of the full budget
    seed0_compute: float | None  # seed 0: the stable run to the last branch point, then each cooldown
    seed_compute: float | None  # a later seed: stable to the last start, its one cooldown
    samples_per_s: float | None  # as its sizing measured (None before it is sized)


def _families_held(cfg: config.StudyConfig, rows: list[PlannedTrial]) -> set[str] | None:
    """The trials the backtest holds out, which run every seed: study.held_out on planned rows
    (None while their compute waits on a measurement)."""
    if any(r.compute is None for r in rows):
        return None  # chosen by compute: known once the trials are sized
    held = held_out(rows, cfg.families, cfg.holdout)
    return {r.name for members in held.values() for r in members}


def _planned(cfg: config.StudyConfig, t: Trial, per_sample: float, spe: int,
             reference: float) -> PlannedTrial:
    """A trial's row of the plan: its steps from its recorded sizing, else from the budget (None
    under a time budget until it is sized)."""
    batch, budget = t.run.train.batch, cfg.parsed_budget
    sizing = _recorded(cfg, t)
    steps = sizing.steps if sizing else None if budget.kind == "time" else steps_for(
        budget, per_sample, batch, spe, 1.0, reference)
    seed0 = extra = None
    if steps is not None:
        plan_ = branches(steps, cfg.fractions, cfg.decay_frac)
        if not plan_ or plan_[-1][0] != max(cfg.fractions):
            raise UserError(f"budget {cfg.budget!r} is too small to train trial {t.name} ({steps} steps "
                            f"of batch {batch}) with a stable phase and a cooldown; raise --budget")
        seed0 = (max(s for _, _, s in plan_) + sum(n - s for _, n, s in plan_)) * batch * per_sample
        extra = steps * batch * per_sample
    m, c = t.run.model, cost(t.run.model)
    return PlannedTrial(
        t.name, tuple(t.strategies), t.factor, t.achieved, m.depth, m.width, m.heads, m.patch_size, m.hw[0],
        m.frames, c.params, c.flops, per_sample, batch, spe, steps,
        config.TRIAL if sizing else MEASURED if steps is None else cfg.budget,
        None if steps is None else steps * batch * per_sample, seed0, extra,
        sizing.measured["samples_per_s"] if sizing else None)


def describe(cfg: config.StudyConfig) -> dict:
    """The study's trials and phases with their steps and training multiply-adds (None where a
    time budget leaves them to a measurement not yet made), as one JSON-able record."""
    trials = plan(cfg)
    planned, splits = {}, {}  # name: its row; name: the data
    reference = reference_compute(trials)
    for t in trials:
        train_set, val_set, test_set, info = build_datasets(t.run.data)
        spe = len(train_set) // t.run.train.batch
        planned[t.name] = _planned(cfg, t, train_flops_per_sample(t.run, info.num_classes), spe, reference)
        splits[t.name] = info, len(train_set), len(val_set), len(test_set)
    base_trial = _base(trials)
    rows = [planned[t.name] for t in trials]
    base = planned[base_trial.name]
    held = _families_held(cfg, rows)
    held_names, held = (None, set()) if held is None else (sorted(held), held)
    known = [r.steps for r in rows if r.steps is not None]  # the sweep's lengths: sweep.lengths
    sweep_steps = None if len(known) < len(rows) else sorted(
        {max(2, round(cfg.sweep_length * n)) for n in (min(known), max(known))})
    sweep = {"lrs": list(cfg.lrs), "steps": sweep_steps, "compute": None if sweep_steps is None else
             len(cfg.lrs) * sum(sweep_steps) * base.batch * base.train_flops_per_sample}
    others = [r for r in rows if r.name not in held]
    leaders = len(others) if cfg.leaders == 0 else min(cfg.leaders, len(others))
    more = cfg.seeds - 1
    return {
        "kind": "StudyPlan", "out": cfg.out, "budget": cfg.budget, "objective": cfg.objective,
        "param": cfg.param, "reference_compute": reference,
        "base": _base_shape(cfg.model, base_trial.run.model),
        "data": _data(base_trial.run.data, *splits[base_trial.name]),
        "trials": [records.to_dict(r) for r in rows],
        "phases": {
            "sizing": f"each of {len(rows)} trials measured (best of 3 rounds): trials/NAME/trial.json",
            "sweep": sweep,
            "stable": f"per trial seed: warm-up {cfg.warmup:g} of its length, then a constant LR to the "
                      "last branch point",
            "cooldowns": {"fractions": sorted(cfg.fractions), "decay_frac": cfg.decay_frac},
            "seeds": {"seeds": cfg.seeds, "held_out": held_names, "leaders": leaders if more else 0,
                      "note": "seed 0 of every trial; the held-out trials and the leaders (chosen by seed "
                              "0's validation accuracy) run the other seeds, full-length cooldown only"},
            "bracket": cfg.bracket,
            "probe_epochs": cfg.probe_epochs if cfg.objective == "mae" else None},
        "compute": _compute(cfg, rows, sweep, held, leaders, more),
        "time": _time(rows, base, sweep, held, leaders, more),
    }


def _compute(cfg: config.StudyConfig, rows: list[PlannedTrial], sweep: dict, held: set[str], leaders: int,
             more: int) -> dict:
    """Training multiply-adds per phase: the held-out trials' later seeds exactly, the leaders'
    (chosen after seed 0) at the others' mean; None where a trial's steps are not known yet."""
    known = all(r.seed0_compute is not None for r in rows)
    extra = seed0 = total = None
    if known:
        others = [r for r in rows if r.name not in held]
        mean = sum(r.seed_compute for r in others) / len(others) if others else 0.0
        extra = more * (sum(r.seed_compute for r in rows if r.name in held) + leaders * mean)
        seed0 = sum(r.seed0_compute for r in rows)
        if sweep["compute"] is not None or not cfg.lrs:
            total = seed0 + extra + (sweep["compute"] or 0.0)
    return {"sweep": sweep["compute"], "seed0": seed0, "more_seeds": extra, "total": total,
            "note": "training multiply-adds (forward + backward); sizing and MAE probes not counted"}


def _base_shape(preset: str, m) -> dict:
    """The base model's shape as the study trains it: its preset's, on the data's input."""
    return {"preset": preset, "side": m.hw[0], "frames": m.frames, "patch": m.patch_size,
            "tokens": m.num_patches, "width": m.width, "depth": m.depth, "heads": m.heads}


def _data(data, info, train: int, val: int, test: int) -> dict:
    """What the study's trials train on: the data's name, where it is, its splits' items, classes."""
    return {"name": data.name, "path": data.path, "items": train + val + test, "train": train, "val": val,
            "test": test, "classes": info.num_classes}


def _time(rows: list[PlannedTrial], base: PlannedTrial, sweep: dict, held: set[str], leaders: int,
          more: int) -> dict | None:
    """Seconds of training per phase, one run at a time, at the samples/s each trial's sizing measured;
    None until every trial is sized. The leaders' extra seeds are taken at the others' mean."""
    if any(r.samples_per_s is None or r.seed0_compute is None for r in rows):
        return None

    def seconds(r: PlannedTrial, compute: float) -> float:
        return compute / r.train_flops_per_sample / r.samples_per_s

    others = [r for r in rows if r.name not in held]
    mean = sum(seconds(r, r.seed_compute) for r in others) / len(others) if others else 0.0
    t = {"sweep": seconds(base, sweep["compute"] or 0.0),
         "seed0": sum(seconds(r, r.seed0_compute) for r in rows),
         "more_seeds": more * (sum(seconds(r, r.seed_compute) for r in rows if r.name in held)
                               + leaders * mean)}
    return t | {"total": sum(t.values()),
                "note": "training steps at the samples/s the sizing measured, one run at a time; "
                        "evaluation not counted"}


def _duration(seconds: float) -> str:
    return (f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min" if seconds >= 60
            else f"{seconds:.3g} s")


def _g(v: float | None) -> str:
    return MEASURED if v is None else f"{v:.3g}"


def lines(p: dict) -> list[str]:
    """The plan as text, one line per trial and phase."""
    out = [f"study plan: {len(p['trials'])} trials, budget {p['budget']} per trial, {p['objective']}, "
           f"{p['param']}; a base-model epoch is {p['reference_compute']:.3g} multiply-adds"]
    b, d = p["base"], p["data"]
    frames = f", {b['frames']} frames" if b["frames"] > 1 else ""
    out.append(f"base: {b['preset']} at {b['side']} px{frames}, patch {b['patch']}, {b['tokens']} tokens, "
               f"width {b['width']}, depth {b['depth']}, heads {b['heads']}")
    out.append(f"data: {d['name']}" + (f" ({d['path']})" if d["path"] else "") + f", {d['items']:,} items: "
               f"{d['train']:,} train, {d['val']:,} val, {d['test']:,} test; {d['classes']} classes")
    for r in p["trials"]:
        shape = (f"depth {r['depth']} width {r['width']} heads {r['heads']} patch {r['patch']} "
                 f"{r['side']}px" + (f" {r['frames']} frames" if r["frames"] > 1 else ""))
        steps = MEASURED if r["steps"] is None else f"{r['steps']} steps ({r['steps_from']})"
        out.append(f"  {r['name']}: {'/'.join(r['strategies'])} x{r['factor']:g} ({r['achieved']:.2f}x), "
                   f"{shape}, {r['params'] / 1e6:.3g}M params, {r['train_flops_per_sample']:.3g} training "
                   f"multiply-adds/sample, batch {r['batch']}, {steps}, compute {_g(r['compute'])}")
    ph, c = p["phases"], p["compute"]
    sw = ph["sweep"]
    out.append(f"sizing: {ph['sizing']}")
    each = f"steps {MEASURED}" if sw["steps"] is None else " and ".join(map(str, sw["steps"])) + " steps"
    out.append("sweep: none (--lrs '')" if not sw["lrs"] else
               f"sweep: base at lrs {', '.join(f'{x:g}' for x in sw['lrs'])}, each for {each}, "
               f"compute {_g(sw['compute'])}; each trial at the rate for its length")
    out.append(f"stable runs: {ph['stable']}")
    out.append(f"cooldowns: at {', '.join(f'{f:g}' for f in ph['cooldowns']['fractions'])} of each budget, "
               f"the last {ph['cooldowns']['decay_frac']:g} of a run of that length")
    s = ph["seeds"]
    held = "chosen when the trials are sized" if s["held_out"] is None else ", ".join(s["held_out"]) or "none"
    out.append(f"seeds: {s['seeds']}; " + ("one each" if s["seeds"] == 1 else
               f"more seeds for the held-out trials ({held}) and the {s['leaders']} best other "
               + ("trial" if s["leaders"] == 1 else "trials")))
    if ph["bracket"]:
        out.append("bracketing: after seed 0, a family whose best sits at an edge of its sizes gets the "
                   f"next factor outward (÷2, ×2), up to {ph['bracket']} a family (not counted below)")
    if ph["probe_epochs"]:
        out.append(f"probe: a {ph['probe_epochs']}-epoch linear probe of each seed's final encoder")
    out.append(f"compute: sweep {_g(c['sweep'])}, seed 0 {_g(c['seed0'])}, more seeds {_g(c['more_seeds'])} "
               f"(estimated), total {_g(c['total'])} multiply-adds")
    t = p["time"]
    out.append("time: known once every trial is sized (the study's first phase; --plan again after it)"
               if t is None else
               f"time: sweep {_duration(t['sweep'])}, seed 0 {_duration(t['seed0'])}, more seeds "
               f"{_duration(t['more_seeds'])} (estimated), total {_duration(t['total'])} of training, "
               "one run at a time, at the samples/s the sizing measured")
    return out


def collect(cfg: config.StudyConfig):
    """Analyse and report what has finished, training nothing: the summary.Summary, with the
    trials (seed 0) not finished named one line each, and what the analysis could not do with
    those that have (`skipped`). The study directory must exist; a bug's traceback goes there."""
    from vitscale.study import report  # local: matplotlib loads only when a study reports

    out = Path(cfg.out)
    if not (out / rundir.STUDY).is_file():
        raise UserError(f"{cfg.out!r} holds no study (no study.yaml); run the study first or choose "
                         "another --out")
    errors.crash_dir(out)
    with lock.held(out, dist.Dist(), "study directory"):
        sweep = sweeps.read_sweep(cfg)
        lr = rates(sweep)
        trials = runner.planned(cfg, lr)
        sizes, seeds = {}, {}
        for t in trials:
            sizes[t.name] = results.finished(trial_dir(cfg, t) / config.TRIAL, Sizing, "not used")
            found = {k: runner._seed_result(cfg, t, k) for k in range(cfg.seeds + 1)}  # + a reseed
            seeds[t.name] = {k: r for k, r in found.items() if isinstance(r, SeedResult)}
            if sizes[t.name] is None or 0 not in seeds[t.name]:
                logger.info(f"missing: {t.name} (seed 0 has not finished)")
        ready = [t for t in trials if sizes[t.name] is not None and 0 in seeds[t.name]]
        if not ready:
            raise UserError(f"no trial of {cfg.out!r} has finished yet; nothing to report")
        logger.info(f"collect: {len(ready)} of {len(trials)} trials finished"
                    + ("; the sweep's best base_lr " + ", ".join(f"{b:.3g} at {n} steps" for n, b in
                                                                  zip(lr.steps, lr.best, strict=True))
                       if lr is not None else ""))
        done = runner._write_results(cfg, ready, sizes, seeds)
        rows = [done[t.name] for t in ready]
        summary = verify.run(cfg, analysis.summarize(cfg, rows, sweep), trials, rows, _finished_only,
                             lambda s, t: results.finished(trial_dir(s, t) / config.TRIAL, Sizing,
                                                           "not used"),
                             lambda s, t, sizing, k: (t.name, None, (s, t, k), None))
        for line in skipped(summary):
            logger.info(line)
        report.write(out, summary, rows)
    return summary


def _finished_only(jobs, done) -> None:
    """A launcher's map that trains nothing: each job's seed as far as it finished."""
    for name, _, (study, trial, k), _ in jobs:
        done(name, runner._seed_result(study, trial, k))


def skipped(summary) -> list[str]:
    """What the analysis could not do with the trials it had, one line each (the report says the
    same at length)."""
    out = []
    rec, bt = summary.recommendation, summary.backtest
    if summary.law is None:
        out.append(f"skipped: the scaling law: no family ({', '.join(summary.strategies)}) has a finished "
                   "trial of another size than the base, or enough points to fit; --collect again when more "
                   "trials have finished")
    if not bt.checks:
        out.append(f"skipped: the backtest: {bt.note or 'no held-out trial could be predicted'}")
    if rec.pick is None:
        why = "no law was fitted" if summary.law is None else "the law names no shape within the budget"
        out.append(f"skipped: the law's recommendation for {rec.budget} ({why}); the best trial measured "
                   "is reported instead")
    return out

