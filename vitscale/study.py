"""The scaling study: which ViT to train for a budget, answered by measurement.

    base model --scaler--> one trial per (strategy, factor) --engine--> results.jsonl
                                                           --analysis--> summary.json, report

Every trial is a run directory under `OUT/trials/NAME` that the engine trains (and
resumes). A trial is finished when its `result.json` exists; `results.jsonl` is rebuilt
from those, atomically, after each trial, so a killed study loses at most the trial it
was in (and that one resumes from its last checkpoint). A trial can also run as its own
torchrun job (`vitscale study --trial NAME`); a later `vitscale study` collects it.

Budgets (the same for every trial):
    epochs:20      every trial trains 20 epochs (bigger models spend more compute)
    compute:20ep   equal training compute: what the base model spends in 20 epochs
    compute:3e12   equal training compute in multiply-adds (forward + backward)
    time:90s       equal wall time (also 2m, 1h): steps from the measured throughput
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitscale import bench, config, engine, tasks
from vitscale.checkpoint import atomic_write_text
from vitscale.complexity import cost
from vitscale.config import RunConfig
from vitscale.data import build_datasets
from vitscale.models.vit import ViTConfig
from vitscale.scaling import parse_strategy, scale_family

OBJECTIVES = ("supervised", "mae")


@dataclass(frozen=True)
class StudyConfig:
    model: str = "pico/4"  # the base preset every strategy scales from
    strategies: tuple[str, ...] = ("d", "w", "r", "d1_w8_r1")
    factors: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # flops factors
    budget: str = "epochs:10"  # per trial: epochs:N | compute:Nep | compute:MACS | time:90s
    objective: str = "supervised"  # supervised | mae (MAE pre-training, then a linear probe)
    probe_epochs: int = 20  # linear-probe epochs after MAE pre-training (not counted in the budget)
    workers: int = 1  # trials at once on this machine; the threads are divided between them
    overrides: tuple[str, ...] = ("data.image_size=16",)  # run-config overrides for every trial
    out: str = "runs/study"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.strategies or not self.factors:
            raise ValueError("a study needs at least one strategy and one factor")
        for s in self.strategies:
            parse_strategy(s)
        if any(f <= 0 for f in self.factors):
            raise ValueError("factors must be positive, e.g. 1,2,4,8")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        parse_budget(self.budget)


@dataclass(frozen=True)
class Budget:
    kind: str  # epochs | compute | time
    amount: float  # epochs; multiply-adds (or base-model epochs when in_epochs); seconds
    in_epochs: bool = False  # compute given as base-model epochs


def parse_budget(text: str) -> Budget:
    m = re.fullmatch(r"(epochs|compute|time):([0-9.eE+-]+)(ep|s|m|h)?", text.strip())
    try:
        kind, amount, unit = m.group(1), float(m.group(2)), m.group(3) or ""
    except (AttributeError, ValueError):
        kind, amount, unit = "", 0.0, ""
    valid = (kind == "epochs" and unit == "") or (kind == "compute" and unit in ("", "ep")) or (
        kind == "time" and unit in ("", "s", "m", "h"))
    if not valid or not amount > 0:
        raise ValueError(f"budget {text!r} not understood; use epochs:20, compute:20ep (base-model epochs), "
                         "compute:3e12 (multiply-adds) or time:90s / time:2m")
    seconds = {"m": 60, "h": 3600}.get(unit, 1)
    return Budget(kind, amount * seconds if kind == "time" else amount, unit == "ep")


@dataclass(frozen=True)
class Trial:
    name: str  # "base", or STRATEGY-xFACTOR
    strategies: tuple[str, ...]  # the families it belongs to (the base belongs to all)
    factor: float  # the flops factor asked for
    achieved: float  # the flops factor reached
    run: RunConfig  # the trial's run config (before the budget sets its length)


# ----------------------------------------------------------------------------- planning
def base_run(study: StudyConfig) -> RunConfig:
    """The run config every trial starts from: the objective's recipe, the base model, overrides."""
    recipe = config.recipe("pretrain" if study.objective == "mae" else "train")
    cfg = config.apply_overrides(config.with_preset(recipe, study.model), list(study.overrides))
    return replace(cfg, out="")


def plan(study: StudyConfig) -> list[Trial]:
    """The trials: one per distinct scaled config (factor 1 is one shared base)."""
    run = base_run(study)
    _, _, info = build_datasets(run.data)
    base = engine.resolve(run, info).model
    trials: dict[ViTConfig, Trial] = {}
    for strategy in study.strategies:
        for s in scale_family(base, strategy, list(study.factors)):
            if s.config in trials:
                t = trials[s.config]
                trials[s.config] = replace(t, strategies=(*t.strategies, strategy))
                continue
            name = "base" if s.config == base else f"{strategy}-x{s.target:g}"
            data = replace(run.data, image_size=s.config.hw[0], frames=s.config.frames)
            trials[s.config] = Trial(name, (strategy,), s.target, s.achieved,
                                     replace(run, model=s.config, data=data))
    return list(trials.values())


def train_flops_per_sample(run: RunConfig, num_classes: int) -> float:
    """Multiply-adds of one training step (forward + backward) per sample, counted by
    PyTorch's FlopCounterMode on meta tensors (bias additions not included)."""
    batch = 2
    with torch.device("meta"):
        train = replace(run.train, mixup=0, cutmix=0)
        module = tasks.build(run.task, run.model.replace(drop_path=0.0), train, run.mae, num_classes)
        x = bench.example_input(run.model, batch, "meta")
        y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        module(x, y).backward()
    return counter.get_total_flops() / 2 / batch


class _Labelled(torch.nn.Module):
    """A task module called as model(x) for the benchmark step (labels held fixed)."""

    def __init__(self, module: torch.nn.Module, y: torch.Tensor):
        super().__init__()
        self.module, self.y = module, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.y)


def measure_trial(run: RunConfig, num_classes: int, rounds: int = 3) -> bench.Measurement:
    """Training-step throughput and peak memory of the trial's task module at its batch:
    the best of a few rounds, so a moment of contention on a shared machine does not stick."""
    device = bench.pick_device(run.train.device)
    torch.manual_seed(run.train.seed)
    module = tasks.build(run.task, run.model, run.train, run.mae, num_classes).to(device)
    x = bench.example_input(run.model, run.train.batch, device)
    y = torch.randint(0, max(num_classes, 1), (run.train.batch,), device=device)
    model = _Labelled(module, y)
    rounds_ = [bench.measure_model(model, x, "train", run.train.dtype, warmup=1, iters=3, loss_fn=lambda v: v)
               for _ in range(rounds)]
    return max(rounds_, key=lambda m: m.samples_per_s)


def steps_for(budget: Budget, per_sample: float, batch: int, steps_per_epoch: int, samples_per_s: float,
              reference: float) -> int:
    """Optimizer steps a trial gets. `reference`: the base model's training multiply-adds
    per epoch (for compute budgets given in base-model epochs)."""
    if budget.kind == "epochs":
        return round(budget.amount * steps_per_epoch)
    if budget.kind == "time":
        return math.floor(budget.amount * samples_per_s / batch)
    macs = budget.amount * reference if budget.in_epochs else budget.amount
    return math.floor(macs / (per_sample * batch))


# ----------------------------------------------------------------------------- one trial
def trial_dir(study: StudyConfig, trial: Trial) -> Path:
    return Path(study.out) / "trials" / trial.name


def _sizing(study: StudyConfig, trial: Trial, reference: float) -> dict:
    """Measure the trial and size it to the budget; saved as trial.json so a resumed
    trial keeps its length (a time budget depends on a measurement)."""
    path = trial_dir(study, trial) / "trial.json"
    if path.is_file():
        return json.loads(path.read_text())
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 measures, the others wait for it
        while not path.is_file():
            time.sleep(0.5)
        return json.loads(path.read_text())
    run = trial.run
    train_set, _, info = build_datasets(run.data)
    per_sample = train_flops_per_sample(run, info.num_classes)
    m = measure_trial(run, info.num_classes)  # the plan resolved the model against the data
    spe = len(train_set) // run.train.batch
    budget = parse_budget(study.budget)
    steps = steps_for(budget, per_sample, run.train.batch, spe, m.samples_per_s, reference)
    if steps < 1:
        raise ValueError(f"budget {study.budget!r} is too small to train trial {trial.name} for one step "
                         f"(batch {run.train.batch}); raise --budget")
    sizing = {"train_flops_per_sample": per_sample, "steps": steps, "steps_per_epoch": spe,
              "measured": m.as_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(sizing, indent=2))
    return sizing


def sized_run(run: RunConfig, steps: int, steps_per_epoch: int, out: Path) -> RunConfig:
    """The run config that trains `steps` steps (the cosine schedule ends there)."""
    epochs = steps / steps_per_epoch
    train = replace(run.train, epochs=math.ceil(epochs), max_steps=steps,
                    warmup_epochs=min(run.train.warmup_epochs, 0.1 * epochs))
    return replace(run, train=train, out=str(out))


def _curve(run_dir: Path, batch: int, per_sample: float, metric: str) -> list[dict]:
    """Per-eval points: step, samples, training compute and training seconds so far, metric."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    points, seconds, last = [], 0.0, 0
    for r in rows:
        if r.get("split") != "val" or metric not in r:
            continue
        seconds += (r["step"] - last) * batch / max(r["samples_per_s"], 1e-9)
        last = r["step"]
        points.append({"step": r["step"], "epoch": r["epoch"], "compute": r["step"] * batch * per_sample,
                       "seconds": seconds, "accuracy": r[metric], "loss": r.get("val_loss"),
                       "samples_per_s": r["samples_per_s"]})
    return points


def run_trial(study: StudyConfig, trial: Trial, reference: float, log=print) -> dict | None:
    """Train one trial (resuming it if it was interrupted) and write its result.json."""
    out = trial_dir(study, trial)
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    sizing = _sizing(study, trial, reference)
    t0 = time.perf_counter()
    pre = sized_run(trial.run, sizing["steps"], sizing["steps_per_epoch"], out / "train")
    final = engine.train(pre, log)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    metric = "val_top1" if trial.run.task == "supervised" else "knn_top1"
    curve = _curve(out / "train", pre.train.batch, sizing["train_flops_per_sample"], metric)
    result = {"accuracy": final.get(metric, float("nan")), "val_loss": final.get("val_loss")}
    if study.objective == "mae":
        probe = config.recipe("linprobe", init=str(out / "train"))
        probe = replace(probe, model=trial.run.model, data=trial.run.data, out=str(out / "probe"),
                        train=replace(probe.train, epochs=study.probe_epochs, seed=trial.run.train.seed,
                                      device=trial.run.train.device, threads=trial.run.train.threads))
        result = {"accuracy": engine.train(probe, log)["val_top1"], "knn_accuracy": result["accuracy"]}
    c = cost(trial.run.model)
    row = {"name": trial.name, "strategies": list(trial.strategies), "factor": trial.factor,
           "achieved": trial.achieved, "model": config.to_dict(trial.run.model),
           "params": c.params, "flops": c.flops, "acts": c.acts,
           "steps": sizing["steps"], "samples": sizing["steps"] * pre.train.batch,
           "train_flops_per_sample": sizing["train_flops_per_sample"],
           "compute": sizing["steps"] * pre.train.batch * sizing["train_flops_per_sample"],
           "measured": sizing["measured"], "wall_s": time.perf_counter() - t0,
           "train_samples_per_s": max((p["samples_per_s"] for p in curve), default=None),
           "curve_metric": metric, "curve": curve} | result
    atomic_write_text(done, json.dumps(row, indent=2))
    return row


def _in_worker(study: StudyConfig, trial: Trial, reference: float, threads: int) -> dict | None:
    """A worker process: its share of the threads, its output to the trial's log.txt."""
    out = trial_dir(study, trial)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")  # noqa: SIM115 (held open for the worker's life)
    os.dup2(log_file.fileno(), sys.stdout.fileno())
    os.dup2(log_file.fileno(), sys.stderr.fileno())
    torch.set_num_threads(threads)
    trial = replace(trial, run=replace(trial.run, train=replace(trial.run.train, threads=threads)))
    return run_trial(study, trial, reference, log=lambda *a, **k: print(*a, flush=True))


# ----------------------------------------------------------------------------- the study
def _prepare(study: StudyConfig) -> Path:
    out = Path(study.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise ValueError(f"cannot write to study directory {study.out!r}: {e.strerror}; "
                         "choose another --out") from None
    saved = out / "study.yaml"
    def identity(s: StudyConfig) -> StudyConfig:  # what the results depend on
        return replace(s, workers=1, out="")

    if saved.is_file() and identity(load_study(saved)) != identity(study) and any(
            (out / "trials").glob("*/result.json")):
        raise ValueError(f"{study.out!r} holds a study with another config; continue it with "
                         f"--config {saved} or choose a new --out")
    atomic_write_text(saved, dump_study(study))
    return out


def reference_compute(trials: list[Trial]) -> float:
    """The base model's training multiply-adds per epoch (the unit of compute:Nep budgets)."""
    base = next((t for t in trials if t.factor == 1), trials[0])
    train_set, _, info = build_datasets(base.run.data)
    per_sample = train_flops_per_sample(base.run, info.num_classes)
    return per_sample * (len(train_set) // base.run.train.batch) * base.run.train.batch


def run_study(study: StudyConfig, only: str | None = None, log=print) -> dict:
    """Run the trials that are not finished, then analyse and report (rank 0)."""
    from vitscale import analysis, study_report

    out = _prepare(study) if int(os.environ.get("RANK", "0")) == 0 else Path(study.out)
    trials = plan(study)
    reference = reference_compute(trials)
    if only:
        trials = [t for t in trials if t.name == only]
        if not trials:
            names = ", ".join(t.name for t in plan(study))
            raise ValueError(f"no trial named {only!r}; the trials are: {names}")
    names = ", ".join(t.name for t in trials)
    in_epochs = parse_budget(study.budget).in_epochs
    unit = f"; a base-model epoch is {reference:.3g} multiply-adds" if in_epochs else ""
    log(f"study: {len(trials)} trials ({names}), budget {study.budget} per trial{unit}")
    rows = _finished(study, trials)
    todo = [t for t in trials if t.name not in rows]
    for t in trials:
        if t.name in rows:
            log(f"{t.name}: finished before, not re-run")
    if study.workers == 1 or len(todo) <= 1:
        for i, t in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {t.name}: {_describe(t)}")
            row = run_trial(study, t, reference, log)
            if row is not None:
                rows[t.name] = row
                _write_results(out, trials, rows, log)
    else:
        threads = max(1, torch.get_num_threads() // study.workers)
        log(f"{study.workers} workers x {threads} threads; each trial logs to trials/NAME/log.txt")
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(study.workers, mp_context=ctx) as pool:
            futures = {pool.submit(_in_worker, study, t, reference, threads): t for t in todo}
            for f in as_completed(futures):
                rows[futures[f].name] = f.result()
                _write_results(out, trials, rows, log)
    if only or int(os.environ.get("RANK", "0")) != 0:
        return {}
    summary = analysis.summarize(study, [rows[t.name] for t in trials])
    study_report.write(out, study, summary, [rows[t.name] for t in trials])
    return summary


def _describe(t: Trial) -> str:
    m = t.run.model
    return (f"depth {m.depth} width {m.width} heads {m.heads} {m.hw[0]}px"
            + (f" {m.frames} frames" if m.frames > 1 else "") + f", {t.achieved:.2f}x flops")


def _finished(study: StudyConfig, trials: list[Trial]) -> dict[str, dict]:
    rows = {}
    for t in trials:
        done = trial_dir(study, t) / "result.json"
        if done.is_file():
            rows[t.name] = json.loads(done.read_text())
    return rows


def _write_results(out: Path, trials: list[Trial], rows: dict[str, dict], log) -> None:
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(rows[t.name]) + "\n" for t in trials
                                                     if t.name in rows))
    last = rows[next(reversed(rows))]
    log(f"{last['name']}: accuracy {last['accuracy']:.4f}, {last['params'] / 1e6:.2f} M params, "
        f"{last['measured']['samples_per_s']:.0f} samples/s, {last['wall_s']:.0f} s")


# ----------------------------------------------------------------------------- files
def dump_study(study: StudyConfig) -> str:
    return config.dump_yaml(study)


def load_study(path: str | Path) -> StudyConfig:
    return config.load_yaml(path, StudyConfig)
