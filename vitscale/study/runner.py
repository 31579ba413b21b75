"""The scaling study: which ViT to train for a budget, answered by measurement.

    base model --scaler--> one trial per (strategy, factor)
    sizing        each trial measured (best of 3) and given its steps by the budget: trial.json
    sweep         the base model at several learning rates (short wsd runs): one LR for all,
                  which holds across shapes because trials are parametrised in muP
    trials        per seed: one stable run (warm-up, then a constant LR) with checkpoints at
                  the branch points, and from each a cooldown branch (the last 20% of a wsd
                  run of that length): an annealed point at each fraction of the budget
    seeds         every trial at seed 0, the leading trials at more seeds
    analysis      fits on annealed points only --> summary.json, report

Runs go where study.launcher sends them (vitscale/study/launch.py: this machine, a Slurm job array,
Ray tasks), one phase at a time. Every run (sweep run, stable run, branch) is an engine run
directory and resumes like one; a trial seed is finished when its `result.json` exists (a typed, versioned
`results.SeedResult`). `results.jsonl` is rebuilt atomically from those, so a killed
study loses at most the runs it was in, and those resume from their last checkpoints.

Selection and reporting use different data: the LR sweep chooses on the validation split;
trials are measured by their final weights on the test split (final.json's test_top1, the
MAE probe's too; val where the data holds no test split).

Budgets (the same for every trial):
    epochs:20      every trial trains 20 epochs (bigger models spend more compute)
    compute:1ep    equal training compute: what the base model spends in one epoch
    compute:3e12   equal training compute in multiply-adds (forward + backward)
    time:90s       equal wall time (also 2m, 1h): steps from the measured throughput
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from vitscale.common import checkpoint, dist, errors, lock, logs, records, rundir, signals
from vitscale.common.errors import Interrupted, NotFinite, UserError
from vitscale.common.io import atomic_write_text
from vitscale.cost.complexity import cost
from vitscale.study import analysis, bracket, diagnose, launch, results, verify
from vitscale.study import sweep as sweeps
from vitscale.study.config import (
    RESULTS,
    SEED_RESULT,
    SWEEP,
    TRIAL,
    StudyConfig,
    base_run,
    dump_study,
    load_study,
)
from vitscale.study.launch import Launcher, launcher_for
from vitscale.study.rates import Rates, rates
from vitscale.study.results import Point, SeedResult, Sizing, TrialResult, finished
from vitscale.study.trials import (
    Trial,
    _base,
    _same_hardware,
    branches,
    held_out,
    metric,
    one_hardware,
    plan,
    reference_compute,
    size_all,
    size_trial,
    sized_run,
    trial_dir,
)
from vitscale.tasks.evaluate import test_name
from vitscale.train import config, engine
from vitscale.train.config import RunConfig
from vitscale.train.metrics import read_metrics

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- runs
def _chosen_by(r: SeedResult) -> float:
    """What the leading trials are chosen by: a seed's validation accuracy at the end of its stable
    run (the last mid-run evaluation), never the test accuracy its points report."""
    return r.curve[-1].accuracy if r.curve else r.final.accuracy


def _reported(final: dict, metric: str) -> tuple[str, str]:
    """(accuracy, loss) keys a finished run is reported by: its test split's (test_top1, test_loss)
    where it has one, else val's. Only the LR sweep and mid-run curves read val alone."""
    test = test_name(metric)
    return (test, "test_loss") if test in final else (metric, "val_loss")


def _point(fraction: float, steps: int, run: RunConfig, sizing: Sizing, final: dict, rate: float,
           annealed: bool) -> Point:
    """A measured point: an annealed run's final.json (reported on test), or a mid-run val row."""
    samples = steps * run.train.batch
    key, loss = _reported(final, metric(run)) if annealed else (metric(run), "val_loss")
    acc = float(final.get(key, float("nan")))
    return Point(fraction, steps, samples, samples * sizing.train_flops_per_sample, samples / rate, acc,
                 final.get(loss), results.binomial_stderr(acc, sizing.val_samples), annealed)


def run_seed(study: StudyConfig, trial: Trial, sizing: Sizing, k: int,
             d: dist.Dist | None = None) -> SeedResult | None:
    """One seed of a trial: the stable run, then a cooldown branch per fraction (seeds after the
    first: the full-length one only); result.json (rank 0: None on the others). A loss that is not
    finite runs the seed again at half the learning rate, in half-lr/ (once: a second stops the
    study); a seed after the first starts at the rate seed 0 ended at."""
    out = trial_dir(study, trial) / f"seed{k}"
    found = _seed_result(study, trial, k)
    if found is not None:
        return found
    _same_hardware(study, f"trial {trial.name}", sizing, trial.run.train.device)
    t0 = time.perf_counter()
    first = _seed_result(study, trial, 0) if k else None
    halved = first.halved if first is not None else 0
    while True:
        lr = trial.lr(sizing.steps) / 2**halved
        run = replace(trial.run, train=replace(trial.run.train, base_lr=lr))
        try:
            got = _train_seed(study, replace(trial, run=run), sizing, k, out / ("half-lr/" * halved), d)
            break
        except NotFinite as e:
            if halved:
                raise
            logger.warning(f"{trial.name} seed {k}: {e}; training it again at half the rate, {lr / 2:g}")
            halved = 1
    if got is None:
        return None
    points, curve, rate, probe = got
    result = SeedResult(trial.name, trial.run.train.seed + k, points, curve, time.perf_counter() - t0, rate,
                        probe, halved)
    results.write(out / SEED_RESULT, result)
    return result


def _train_seed(study: StudyConfig, trial: Trial, sizing: Sizing, k: int, out: Path,
                d: dist.Dist | None) -> tuple | None:
    """A seed's runs in `out`: (points, curve, throughput, probe), None on a rank but the first."""
    plan_ = branches(sizing.steps, study.fractions if k == 0 else (max(study.fractions),), study.decay_frac)
    seed, spe = trial.run.train.seed + k, sizing.steps_per_epoch

    def run(name: str, **train) -> RunConfig:
        return sized_run(trial.run, study, sizing.steps, spe, seed, out / name, **train)

    stable = run("stable", decay_frac=0.0, max_steps=max(s for _, _, s in plan_),
                 keep_steps=tuple(s for _, _, s in plan_))
    engine.train(stable, d)
    rows = engine_rows(Path(stable.out))
    rate = next((r["samples_per_s"] for r in reversed(rows)), sizing.measured["samples_per_s"])
    curve = tuple(_point(r["step"] / sizing.steps, r["step"], trial.run, sizing, r, rate, False)
                  for r in rows)
    points, last = [], None
    for f, length, start in plan_:
        last = run(f"cool-{f:g}", decay_frac=study.decay_frac, max_steps=length,
                   branch_from=str(checkpoint.at(stable.out, start)))
        points.append(_point(f, length, trial.run, sizing, engine.train(last, d).metrics, rate, True))
    probe = _probe(study, trial, last, seed, d) if study.objective == "mae" else None
    return None if d is not None and not d.main else (tuple(points), curve, rate, probe)


def _seed_result(study: StudyConfig, trial: Trial, k: int) -> SeedResult | None:
    """Seed k of a trial as its result.json has it, if it finished (and the file is whole)."""
    return finished(trial_dir(study, trial) / f"seed{k}" / SEED_RESULT, SeedResult,
                    "running that seed again (its runs resume from their checkpoints)",
                    trial=trial.name, seed=trial.run.train.seed + k)


def engine_rows(run_dir: Path) -> list[dict]:
    """The validation rows of a run's metrics.jsonl (mid-run evaluations)."""
    return [r for r in read_metrics(run_dir) if r.get("split") == "val"]


def _probe(study: StudyConfig, trial: Trial, pretrained: RunConfig, seed: int,
           d: dist.Dist | None) -> float:
    """MAE objective: a linear probe of the full-length encoder, its final checkpoint (not best/,
    the best k-NN epoch: the budget counts every step); the probe is not counted in the budget."""
    final = checkpoint.last_good(Path(pretrained.out))
    if final is None:
        raise UserError(f"{pretrained.out} has no whole checkpoint to probe; run the study again to redo it")
    probe = config.recipe("linprobe", init=str(final))
    probe = replace(probe, model=trial.run.model, data=trial.run.data,
                    out=str(Path(pretrained.out).parent / "probe"),
                    train=replace(probe.train, epochs=study.probe_epochs, seed=seed,
                                  probe_scales=trial.run.train.probe_scales,  # S² in a recipe
                                  device=trial.run.train.device, threads=trial.run.train.threads))
    final = engine.train(probe, d).metrics
    return float(final[_reported(final, "val_top1")[0]])


# ----------------------------------------------------------------------------- the study
def _prepare(study: StudyConfig) -> Path:
    out = Path(study.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
        errors.crash_dir(out)
    except OSError as e:
        raise UserError(f"cannot write to study directory {study.out!r}: {e.strerror}; "
                         "choose another --out") from None
    saved = out / rundir.STUDY

    def identity(s: StudyConfig) -> tuple[StudyConfig, RunConfig]:  # what the results depend on
        # the overrides as the run config they make: a study.yaml written before the demo's settings
        # had their own place (DEMO) holds them among its overrides, and its trials are the same
        return (replace(s, workers=0, seeds=1, leaders=0, out="", holdout=0, target="", ahead=(),
                        launcher="local", launcher_args=(), overrides=()), base_run(s))

    if saved.is_file() and identity(load_study(saved)) != identity(study) and any(
            (out / "trials").glob("*/trial.json")):
        raise UserError(f"{study.out!r} holds a study with another config; continue it with "
                         f"--config {saved} or choose a new --out")
    atomic_write_text(saved, dump_study(study))
    return out


def check_study_dir(out: str, base: RunConfig) -> None:
    """Refuse a --out that is no study directory (vitscale.common.rundir: new, empty or holding study.yaml)
    or that lies inside the trials' data."""
    rundir.check_outside(out, base.data)
    rundir.check_out(out, "study", rundir.STUDY)


def run_study(study: StudyConfig, only: str | None = None):
    """Size, sweep, train what is not finished, then analyse and report (rank 0): the
    summary.Summary, or None where this process only trained (`only`, ranks above 0).

    One process works on a study directory at a time (on one trial's directory, with `only`:
    one job per trial may share the study), rank 0 holding the lock for all ranks. A signal
    stops it with its runs checkpointed (Interrupted)."""
    launch.available(study)  # Slurm without sbatch, a launcher's package missing: before anything is written
    base = base_run(study)
    d = dist.setup(base.train.device)
    where = Path(study.out) / (SWEEP if only == SWEEP else f"trials/{only}" if only else "")
    try:
        dist.on_main(d, lambda: check_study_dir(study.out, base))  # before the lock, the first write
        with logs.quiet(not d.main), lock.held(where, d, "study directory"), signals.deferred():
            return _run_study(study, only, d)
    except Interrupted as e:
        raise Interrupted(f"{e}; the study's finished runs are kept, its others checkpointed: to continue, "
                          f"run the same command again (or vitscale study --config {study.out}/study.yaml"
                          + (f" --trial {only}" if only else "") + ")") from None
    finally:
        dist.teardown(d)


def _run_study(study: StudyConfig, only: str | None, d: dist.Dist):
    from vitscale.study import report  # local: matplotlib loads only when a study reports

    out = dist.on_main(d, lambda: _prepare(study))
    trials = planned(study, None) if only else plan(study)
    names = [t.name for t in trials]
    if only and only not in (*names, SWEEP):
        raise UserError(f"no trial named {only!r}; the trials are: {', '.join(names)}, and {SWEEP}")
    reference = reference_compute(trials)
    in_epochs = study.parsed_budget.in_epochs
    unit = f"; a base-model epoch is {reference:.3g} multiply-adds" if in_epochs else ""
    cooldowns = ", ".join(f"{f:g}" for f in sorted(study.fractions))
    logger.info(f"study: {len(trials)} trials ({', '.join(names)}), budget {study.budget} per trial{unit}, "
                f"{study.param}, cooldowns at {cooldowns} of each budget")
    if study.launcher != "local" and d.enabled:
        raise UserError(f"--launcher {study.launcher} starts the study's jobs itself; run it without "
                         "torchrun")
    runner = launcher_for(study, 1 if only or d.enabled else study.pool_size,
                          base_run(study).train.device)
    try:
        wanted = trials if not only or only == SWEEP else [t for t in trials if t.name in ("base", only)]
        sizes = _sizes(study, wanted, reference, runner, d, out)
        base = _base(trials)
        sweep = sweeps.sweep(study, base, sizes[base.name], runner, d, run=not only or only == SWEEP,
                             steps=sweeps.lengths(study, list(sizes.values())))
        if only == SWEEP:
            return None
        lr = rates(sweep)
        trials = planned(study, lr) if only else plan(study, lr)
        if only:
            trials = [t for t in trials if t.name == only]
            runner.map([_job(study, t, sizes[t.name], k, d) for t in trials for k in range(study.seeds)],
                       lambda name, r: None)
            return None
        trials, done = _collect(study, trials, sizes, runner, d, lr,
                                lambda ts: _sizes(study, ts, reference, runner, d, out))
        rows = dist.on_main(d, lambda: [done[t.name] for t in trials])  # rank 0's: the others' lack results
        summary = dist.on_main(d, lambda: analysis.summarize(study, rows, sweep))
        summary = verify.run(study, summary, trials, rows, runner.map,
                             lambda s, t: size_trial(s, t, reference, runner.threads, d),
                             lambda s, t, sizing, k: _job(s, t, sizing, k, d))
    finally:
        runner.close()
    if not d.main:
        return None
    report.write(out, summary, rows)
    return summary


def _sizes(study: StudyConfig, trials: list[Trial], reference: float, runner: Launcher, d: dist.Dist,
           out: Path) -> dict[str, Sizing]:
    """Each trial's sizing (trial.json), measured where it is not recorded; on a remote launcher one
    job on one node measures them all, before any trains."""
    sizes = {}
    todo = [t for t in trials if not (trial_dir(study, t) / TRIAL).is_file()]
    if runner.remote and todo:
        runner.map([("sizing", size_all, (study, todo, reference, runner.threads), out / "sizing.log")],
                   lambda name, got: sizes.update(got))
    for t in trials:
        if t.name not in sizes:
            sizes[t.name] = size_trial(study, t, reference, runner.threads, d)
        signals.check("while sizing the trials")
    one_hardware(study, sizes)
    return sizes


def _job(study: StudyConfig, trial: Trial, sizing: Sizing, k: int, d: dist.Dist) -> tuple:
    log_path = trial_dir(study, trial) / f"seed{k}" / "log.txt"
    return (f"{trial.name} seed {k}: {_describe(trial, sizing)}", run_seed, (study, trial, sizing, k, d),
            log_path)


def extra_seeds(trials: list, score: dict[str, float], held: set[str], leaders: int) -> list:
    """The trials that run every seed, best first: the `leaders` best by `score` among the trials
    the law is fitted to (0: all), then the held-out ones. A held-out trial never takes a leader's
    place: its seeds judge the backtest, and a choice it shaped would have seen what it judges."""
    ranked = sorted((t for t in trials if t.name not in held), key=lambda t: -score[t.name])
    return (ranked if leaders == 0 else ranked[:leaders]) + [t for t in trials if t.name in held]


def _collect(study: StudyConfig, trials: list[Trial], sizes: dict[str, Sizing], runner: Launcher,
             d: dist.Dist, lr: Rates | None, size) -> tuple[list[Trial], dict[str, TrialResult]]:
    """Seed 0 of every trial, then of the factors bracketing adds (bracket.py), then the other seeds
    of the leading trials, then one more for a trial whose seeds disagree (diagnose.py); results.jsonl
    as they land. `size(trials)`: their sizings."""
    seeds: dict[str, dict[int, SeedResult]] = {t.name: {} for t in trials}
    by_name = {t.name: t for t in trials}

    def done(name: str, r: SeedResult | None) -> None:
        if r is None:
            return
        seeds[r.trial][r.seed - by_name[r.trial].run.train.seed] = r
        _write_results(study, list(by_name.values()), sizes, seeds)
        logger.info(f"{name.split(':')[0]}: accuracy {100 * r.final.accuracy:.1f}% "
                    f"(annealed: {', '.join(f'{100 * p.accuracy:.1f}' for p in r.points)}), {r.wall_s:.0f} s")

    def run(units: list[tuple[Trial, int]]) -> None:
        jobs = []
        for t, k in units:
            found = _seed_result(study, t, k)
            if found is not None:
                seeds[t.name][k] = found
                continue
            jobs.append(_job(study, t, sizes[t.name], k, d))
        if len(jobs) < len(units):
            logger.info(f"{len(units) - len(jobs)} trial seeds finished before, not re-run")
        runner.map(jobs, done)

    def seed0(new: list[Trial]) -> dict[str, tuple[float, float]]:
        if fresh := [t for t in new if t.name not in by_name]:
            logger.info(f"bracketing: {', '.join(t.name for t in fresh)} (a family's best sat at an edge "
                        "of its sizes)")
            sizes.update(size(fresh))
            one_hardware(study, sizes)
            by_name.update({t.name: t for t in fresh})
            seeds.update({t.name: {} for t in fresh})
        run([(t, 0) for t in new])
        return chosen(new, seeds)

    trials = bracket.grow(study.bracket, trials, lambda extra: plan(study, lr, extra), seed0)
    rows = [_trial_result(t, sizes[t.name], seeds[t.name]) for t in trials]
    held = {r.name for rs in held_out(rows, study.families, study.holdout).values() for r in rs}
    leading = extra_seeds(trials, {t.name: _chosen_by(seeds[t.name][0]) for t in trials}, held, study.leaders)
    run([(t, k) for t in leading for k in range(1, study.seeds)])
    rows = [_trial_result(t, sizes[t.name], seeds[t.name]) for t in trials]
    unstable = diagnose.reseed(rows, diagnose.diagnose(rows))  # seeds that disagree: one more, once
    run([(by_name[n], len(seeds[n])) for n in sorted(unstable)])
    return trials, _write_results(study, trials, sizes, seeds)


def planned(study: StudyConfig, lr: Rates | None) -> list[Trial]:
    """The study's trials as far as bracketing has grown them: its plan, and the factors that the
    finished seed-0 results on disk added (what `--trial` and `--collect` see, training nothing)."""
    def finished_(new: list[Trial]) -> dict[str, tuple[float, float]]:
        return chosen(new, {t.name: {0: r} for t in new if (r := _seed_result(study, t, 0)) is not None})

    return bracket.grow(study.bracket, plan(study, lr), lambda extra: plan(study, lr, extra), finished_)


def chosen(trials: list[Trial], seeds: dict[str, dict[int, SeedResult]]) -> dict[str, tuple[float, float]]:
    """What bracketing chooses by: each trial's seed-0 validation accuracy at the end of its stable run,
    and that accuracy's binomial standard error (the trials whose seed 0 has finished)."""
    out = {}
    for t in trials:
        if (r := seeds.get(t.name, {}).get(0)) is not None:
            last = r.curve[-1] if r.curve else r.final
            out[t.name] = (last.accuracy, last.stderr)
    return out


def _trial_result(t: Trial, sizing: Sizing, seeds: dict[int, SeedResult]) -> TrialResult:
    c = cost(t.run.model)
    lr = t.lr(sizing.steps) / 2 ** max((s.halved for s in seeds.values()), default=0)  # as its seeds ran
    return TrialResult(t.name, t.strategies, t.factor, t.achieved, records.to_dict(t.run.model), c.params,
                       c.flops, c.acts, t.run.train.batch, lr, sizing.steps,
                       sizing.train_flops_per_sample, sizing.measured, sizing.val_samples,
                       tuple(seeds[k] for k in sorted(seeds)))


def _write_results(study: StudyConfig, trials: list[Trial], sizes: dict[str, Sizing],
                   seeds: dict[str, dict[int, SeedResult]]) -> dict[str, TrialResult]:
    rows = {t.name: _trial_result(t, sizes[t.name], seeds[t.name]) for t in trials if 0 in seeds[t.name]}
    atomic_write_text(Path(study.out) / RESULTS,
                      "".join(json.dumps(r.row()) + "\n" for r in rows.values()))
    return rows


def _describe(t: Trial, sizing: Sizing) -> str:
    m = t.run.model
    return (f"depth {m.depth} width {m.width} heads {m.heads} {m.hw[0]}px"
            + (f" {m.frames} frames" if m.frames > 1 else "")
            + f", {t.achieved:.2f}x flops, {sizing.steps} steps")


