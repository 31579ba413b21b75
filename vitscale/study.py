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

Runs go where study.launcher sends them (vitscale/launch.py: this machine, a Slurm job array,
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
import math
import os
import platform
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vitscale import (
    bench,
    checkpoint,
    config,
    dist,
    engine,
    errors,
    launch,
    lock,
    optim,
    results,
    rundir,
    signals,
    tasks,
)
from vitscale.checkpoint import atomic_write_text
from vitscale.complexity import cost
from vitscale.config import RunConfig
from vitscale.counted import sample_shapes, train_flops_per_sample
from vitscale.data import build_datasets
from vitscale.device import pick_device
from vitscale.errors import Interrupted, UserError
from vitscale.evaluate import test_name
from vitscale.launch import Launcher, launcher_for
from vitscale.models.vit import ViTConfig
from vitscale.results import Point, SeedResult, Sizing, StaleResult, SweepPoint, TrialResult
from vitscale.scaling import parse_strategy, scale_family

OBJECTIVES = ("supervised", "mae")
SWEEP = "sweep"  # --trial sweep runs the learning-rate sweep alone
LAUNCHERS = ("local", "slurm", "ray")


@dataclass(frozen=True)
class StudyConfig:
    model: str = "pico/4"  # the base preset every strategy scales from

    # scaling strategies, as `vitscale scale` takes them. d and w by default: r (and r's share of
    # d1_w8_r1) changes the token count, across which muP does not carry the learning rate, so the
    # one learning rate swept on the base would not suit its trials
    strategies: tuple[str, ...] = ("d", "w")

    # flops factors of the trials relative to the base (1 = the base): on both sides of it, since
    # under a fixed budget a larger model trains fewer steps and may lose to a smaller one
    factors: tuple[float, ...] = (0.5, 1.0, 1.5, 2.25)

    # what every trial may spend: epochs:N (N epochs each), compute:Nep (what the base spends in N
    # epochs), compute:MACS (multiply-adds) or time:90s (wall time; also 2m, 1h). Equal compute
    # compares shapes at equal cost
    budget: str = "compute:4ep"
    objective: str = "supervised"  # supervised, or mae: MAE pre-training, then a linear probe scores it

    # mup: every trial parametrised in muP relative to the base, so that one learning rate swept on
    # the base suits every shape; sp: the standard parametrisation
    param: str = "mup"

    # base_lr values swept on the base model, the best used by every trial (doubling steps span a
    # wide range in few runs); empty (--lrs '') = no sweep: every trial at its train.base_lr
    lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3, 1.6e-2)
    sweep_length: float = 0.5  # a sweep run's length as a share of the base trial's: LRs ranked at half cost

    # cooldown branch points as shares of each trial's budget: each is an annealed point on the
    # trial's curve, branched from one stable run, from which the fits are made
    fractions: tuple[float, ...] = (0.35, 0.5, 0.71, 1.0)
    decay_frac: float = 0.2  # a cooldown's share of the run length it ends (the decay of a wsd schedule)
    warmup: float = 0.05  # linear warm-up as a share of each trial's full length

    # seeds of the leading and the held-out trials, whose noise matters most; every other trial
    # runs seed 0 only, and seeds after the first run only the full-length cooldown
    seeds: int = 2
    leaders: int = 2  # how many trials, best first by seed 0, run every seed (0 = all trials)
    holdout: int = 1  # each strategy's largest trials the backtest holds out and predicts (0 = no backtest)
    target: str = ""  # the budget to recommend for: compute:MACS or time:10m ("" = the study's budget)
    ahead: tuple[float, ...] = (2.0, 10.0, 100.0)  # larger budgets, as multiples of the study's, to predict
    probe_epochs: int = 20  # linear-probe epochs after MAE pre-training (not counted in the budget)

    # trials trained at once; 0 = auto: 1 on a GPU, else one single-thread worker per CPU core, up to
    # 4 (more workers share the same cores)
    workers: int = 0

    # run-config overrides for every trial (--section.key=value, e.g. data.name=image-folder
    # data.path=DIR). With no data named, a study runs the demo: generated cluttered digits at 16 px,
    # 16,384 training samples an epoch, batch 32, and (on its pico/4 base) heads of 16 channels. On
    # your own data every trial starts from the base preset's shape and resolution, and an epoch is
    # your data's; `vitscale study --plan` shows both
    overrides: tuple[str, ...] = ()

    # training recipes studied as families of their own, "NAME:KEY=VALUE[ KEY=VALUE...]" (e.g.
    # "mr:train.resolutions=12,16,20"): each runs every strategy's trials again under its overrides
    # (base+mr, w+mr-x1.5), fitted and reported as a family (w+mr)
    recipes: tuple[str, ...] = ()

    # where runs go: local (this machine, `workers` at once), slurm (a submitit job array; submitit
    # runs each job from a pickle it writes in the study's slurm/ folder, so keep that folder yours;
    # vitscale reads the jobs' values back as JSON) or ray (Ray tasks)
    launcher: str = "local"

    # KEY=VALUE for the launcher, each checked for its type and range before anything starts (an
    # unknown key is refused with the known ones): slurm's are submitit's executor parameters
    # (timeout_min=240 slurm_partition=gpu gpus_per_node=1 cpus_per_task=8) and cluster=local for
    # submitit's local executor, ray's num_cpus, num_gpus, ranks, max_retries, address; both take
    # retries (resubmissions of a failed job)
    launcher_args: tuple[str, ...] = ()

    # the study directory (--out; never a config file's): a new or empty folder, or this study's,
    # which continues; never the filesystem root, a home directory or a folder of other files
    out: str = "runs/study"

    def __post_init__(self) -> None:
        checks = [
            (self.objective in OBJECTIVES,
             f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.param in ("sp", "mup"), f"param must be sp or mup, got {self.param!r}"),
            (bool(self.strategies) and bool(self.factors),
             "a study needs at least one strategy and one factor"),
            (len(set(self.strategies)) == len(self.strategies),
             f"strategies must each be given once, got {','.join(self.strategies)}"),
            (all(f > 0 for f in self.factors), "factors must be positive, e.g. 1,2,4,8"),
            (all(1 / 64 <= f <= 1024 for f in self.factors),  # beyond, the plan builds models of gigabytes
             "factors must be between 1/64 and 1024 (the base's flops times each), e.g. 0.5,1,2,4"),
            (bool(self.fractions) and all(0 < f <= 1 for f in self.fractions),
             "fractions must be in (0, 1], e.g. 0.125,0.25,0.5,1"),
            (all(lr > 0 for lr in self.lrs), "lrs must be positive learning rates, e.g. 1e-3,2e-3,4e-3"),
            (0 < self.sweep_length <= 1, "sweep_length must be in (0, 1]"),
            (0 < self.decay_frac < 1, "decay_frac must be in (0, 1), e.g. 0.2"),
            (0 <= self.warmup < 0.5, "warmup must be in [0, 0.5), e.g. 0.05"),
            (self.seeds >= 1 and self.leaders >= 0, "seeds must be at least 1 and leaders 0 or more"),
            (self.workers >= 0, "workers must be 0 (auto) or more"),
            (self.launcher in LAUNCHERS,
             f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}"),
            (self.holdout >= 0, "holdout must be 0 (no backtest) or more"),
            (all(m > 0 for m in self.ahead), "ahead must be positive multiples of the budget, e.g. 2,10,100"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for s in self.strategies:
            parse_strategy(s)
        parse_budget(self.budget)
        target = parse_budget(self.target, "target") if self.target else None
        if target and (target.kind == "epochs" or target.in_epochs):
            raise UserError(f"target {self.target!r}: give a compute (compute:3e12) or time (time:10m) "
                             "budget")
        if any(o.lstrip("-").startswith("train.multigrid=") and o.partition("=")[2] for o in self.overrides):
            raise UserError("train.multigrid cannot be set for a study's trials yet (its steps take varying "
                            "numbers of samples, which the study does not size); leave it out")
        parse_recipes(self)
        launch.options(self.launcher, self.launcher_args)  # typed and in range, before anything starts

    @property
    def families(self) -> tuple[str, ...]:
        """Every family the study fits: each strategy, then each strategy under each recipe (w+mr)."""
        return (*self.strategies, *(f"{s}+{name}" for name in recipe_names(self) for s in self.strategies))

    @property
    def pool_size(self) -> int:
        if self.workers:
            return self.workers
        return 1 if torch.cuda.is_available() else max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Budget:
    kind: str  # epochs | compute | time
    amount: float  # epochs; multiply-adds (or base-model epochs when in_epochs); seconds
    in_epochs: bool = False  # compute given as base-model epochs


# The largest budget each kind takes: far beyond any study, but finite (1e400 reads as infinity, whose
# steps would be an OverflowError): a million epochs, 1e30 multiply-adds, a year of training.
MOST = {"epochs": (1e6, "1e+06 epochs"), "compute": (1e30, "1e+30 multiply-adds"),
        "time": (365 * 86400.0, "a year (31536000 s)")}


def parse_budget(text: str, what: str = "budget") -> Budget:
    """A budget (or, `what`, a target) from its text: one-line UserErrors for one not understood or
    out of range."""
    m = re.fullmatch(r"(epochs|compute|time):([0-9.eE+-]+)(ep|s|m|h)?", text.strip())
    try:
        kind, amount, unit = m.group(1), float(m.group(2)), m.group(3) or ""
    except (AttributeError, ValueError):
        kind, amount, unit = "", 0.0, ""
    valid = (kind == "epochs" and unit == "") or (kind == "compute" and unit in ("", "ep")) or (
        kind == "time" and unit in ("", "s", "m", "h"))
    if not valid or not amount > 0:
        raise UserError(f"{what} {text!r} not understood; use epochs:20, compute:20ep (base-model epochs), "
                         "compute:3e12 (multiply-adds) or time:90s / time:2m")
    seconds = {"m": 60, "h": 3600}.get(unit, 1)
    budget = Budget(kind, amount * seconds if kind == "time" else amount, unit == "ep")
    most, words = MOST["epochs" if budget.in_epochs else kind]
    if not budget.amount <= most:
        raise UserError(f"{what} {text!r} is out of range: at most {words}; give a finite budget")
    return budget


@dataclass(frozen=True)
class Trial:
    name: str  # "base", or STRATEGY-xFACTOR
    strategies: tuple[str, ...]  # the families it belongs to (the base belongs to all)
    factor: float  # the flops factor asked for
    achieved: float  # the flops factor reached
    run: RunConfig  # the trial's run config (before the budget sets its length)


# ----------------------------------------------------------------------------- recipes
# What a recipe may not set: the model's shape (the strategies scale it from the base) and what
# the study sets itself for every run (its length, schedule, learning rate, seeds).
SHAPE_KEYS = ("model.image_size", "model.patch_size", "model.frames", "model.tubelet", "model.in_chans",
              "model.width", "model.depth", "model.heads", "model.mlp_ratio", "model.num_classes",
              "model.param", "model.base_width", "model.base_depth", "model.base_head_dim",
              "data.image_size", "data.frames")
STUDY_KEYS = ("train.epochs", "train.max_steps", "train.schedule", "train.decay_frac", "train.warmup_epochs",
              "train.base_lr", "train.seed", "train.keep_steps", "train.branch_from", "train.device",
              "task", "out", "data.name", "data.path")
_RECIPE_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")


def parse_recipes(study: StudyConfig) -> dict[str, tuple[str, ...]]:
    """{name: overrides} of the study's recipes, each checked against the base run (one-line errors)."""
    out: dict[str, tuple[str, ...]] = {}
    plain = base_run(study) if study.recipes else None
    for text in study.recipes:
        name, sep, rest = text.partition(":")
        overrides = tuple(rest.split())
        if not sep or not _RECIPE_NAME.fullmatch(name) or not overrides:
            raise UserError(f"recipe {text!r} not understood; write NAME:KEY=VALUE[ KEY=VALUE...], NAME in "
                            "lower-case letters and digits (e.g. mr:train.resolutions=12,16,20)")
        if name in out:
            raise UserError(f"recipe name {name!r} is given twice; give each recipe its own name")
        for o in overrides:
            key = o.lstrip("-").partition("=")[0]
            if key in SHAPE_KEYS:
                raise UserError(f"recipe {name!r} sets {key}, the model shape the strategies scale; "
                                "scale it with --strategy/--factors or set it for every trial with --model")
            if key == "train.multigrid":  # its steps take varying samples, which trials do not count yet
                raise UserError(f"recipe {name!r} sets train.multigrid, which the study cannot size yet "
                                "(its steps take varying numbers of samples); leave it out of the recipe")
            if key in STUDY_KEYS:
                raise UserError(f"recipe {name!r} sets {key}, which the study sets for every run; "
                                "leave it out of the recipe")
            if key == "train.probe_scales" and study.objective != "mae":
                raise UserError(f"recipe {name!r} sets train.probe_scales (S²), which acts on the MAE "
                                "objective's linear probe only; use --objective mae")
        if any("r" in parse_strategy(s) or "t" in parse_strategy(s) for s in study.strategies) and any(
                o.lstrip("-").startswith("train.resolutions=") for o in overrides):
            raise UserError(f"recipe {name!r} sets train.resolutions, but a strategy scales the resolution "
                            "(r) or frames (t) its sides are fixed against; use d/w strategies with it")
        try:
            config.apply_overrides(plain, list(overrides))
        except UserError as e:
            raise UserError(f"recipe {name!r}: {e}") from None
        out[name] = overrides
    return out


def recipe_names(study: StudyConfig) -> tuple[str, ...]:
    return tuple(text.partition(":")[0] for text in study.recipes)


# ----------------------------------------------------------------------------- planning
# The demo's trial settings (`make demo`), for a study on its default data only: the generated
# cluttered digits, a fixed epoch, and batch 32 (more optimizer steps per sample on a CPU).
# DEMO_SHAPE is for the default base alone: 16 px (16 tokens at pico/4's patch 4), and heads of 16
# channels at its width 64, so that w keeps the head size at every factor (48 = 3x16, 80 = 5x16,
# 96 = 6x16) where the preset's heads of 32 force odd splits on the widths between. Another base on
# the demo's data keeps its own heads and the data's native 32 px (a patch-16 preset at 16 px would
# see one token).
DEMO_DATA = "cluttered-digits"
DEMO = ("data.name=cluttered-digits", "data.scale_min=1", "data.train_size=16384", "train.batch=32")
DEMO_MODEL, DEMO_SHAPE = "pico/4", ("data.image_size=16", "model.heads=4")


def demo_settings(study: StudyConfig) -> tuple[str, ...]:
    """The demo's settings a study's own overrides come after: DEMO where its data is the default
    (no data.name given, or cluttered-digits), with DEMO_SHAPE where its base is DEMO_MODEL; none on
    any other data. (A study.yaml from before DEMO was split out holds them among its overrides.)"""
    pairs = [o.lstrip("-").partition("=") for o in study.overrides]
    names = [value for key, _, value in pairs if key == "data.name"]
    if (names[-1] if names else DEMO_DATA) != DEMO_DATA:
        return ()
    return DEMO + (DEMO_SHAPE if study.model == DEMO_MODEL else ())


def base_run(study: StudyConfig) -> RunConfig:
    """The run config every trial starts from: the objective's recipe, the base model, the demo's
    settings on the demo's data, the study's overrides; its input shape decided (engine.settle)."""
    recipe = config.recipe("pretrain" if study.objective == "mae" else "train")
    overrides = [*demo_settings(study), *study.overrides]
    cfg = config.apply_overrides(config.with_preset(recipe, study.model), overrides)
    return engine.settle(replace(cfg, out=""))


def plan(study: StudyConfig, lr: float | None = None) -> list[Trial]:
    """The trials: one per distinct scaled config (factor 1 is one shared base), then the same
    under each recipe (base+NAME, STRATEGY+NAME-xFACTOR). Under muP every config is parametrised
    relative to its base; `lr` sets every trial's base_lr."""
    plain = base_run(study)
    train_set, _, _, info = build_datasets(plain.data)
    if len(train_set) < plain.train.batch:  # an epoch of no step: every budget would be 0
        raise UserError(f"the training split of {plain.data.name} holds {len(train_set)} items, fewer than "
                        f"a batch of {plain.train.batch}; lower --train.batch or give the study more data")
    trials: dict[tuple[str, ViTConfig], Trial] = {}
    for recipe, overrides in {"": (), **parse_recipes(study)}.items():
        run = config.apply_overrides(plain, list(overrides))
        if lr is not None:
            run = replace(run, train=replace(run.train, base_lr=lr))
        base = engine.resolve(run, info).model
        if study.param == "mup":
            base = base.replace(param="mup", base_width=base.width, base_depth=base.depth,
                                base_head_dim=base.width // base.heads)
        tag = f"+{recipe}" if recipe else ""
        for strategy in study.strategies:
            try:
                family = scale_family(base, strategy, list(study.factors))
            except UserError as e:
                raise UserError(f"recipe {recipe!r} with strategy {strategy}: {e}") from None
            for s in family:
                key = (recipe, s.config)
                if key in trials:
                    t = trials[key]
                    trials[key] = replace(t, strategies=(*t.strategies, strategy + tag))
                    continue
                name = f"base{tag}" if s.config == base else f"{strategy}{tag}-x{s.target:g}"
                data = replace(run.data, image_size=s.config.hw[0], frames=s.config.frames)
                trials[key] = Trial(name, (strategy + tag,), s.target, s.achieved,
                                    replace(run, model=s.config, data=data))
    return list(trials.values())


def is_base(name: str) -> bool:
    """Whether a trial is a base: the study's (base) or a recipe's (base+NAME)."""
    return name == "base" or name.startswith("base+")


class _Labelled(torch.nn.Module):
    """A task module called as model(x) for the benchmark step (labels held fixed)."""

    def __init__(self, module: torch.nn.Module, y: torch.Tensor):
        super().__init__()
        self.module, self.y = module, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.y)


def measure_trial(run: RunConfig, num_classes: int, rounds: int = 3) -> bench.Measurement:
    """Training-step throughput and peak memory of the trial's task module at its batch:
    the best of a few rounds, so a moment of contention on a shared machine does not stick.
    At each input shape the run trains at (sample_shapes: train.resolutions' sides), combined
    as the run spends its time: seconds per sample and per step their share-weighted means,
    peak memory the largest (the batch resize between loader and model is not timed)."""
    device = pick_device(run.train.device)
    torch.manual_seed(run.train.seed)
    module = tasks.build(run, num_classes).to(device)
    y = torch.randint(0, max(num_classes, 1), (run.train.batch,), device=device)
    model = _Labelled(module, y)
    parts = []
    for (frames, side), share in sample_shapes(run).items():
        x = bench.example_input(run.model.replace(frames=frames, image_size=side), run.train.batch, device)
        rounds_ = [bench.measure_model(model, x, "train", run.train.dtype, warmup=1, iters=3,
                                       loss_fn=lambda v: v) for _ in range(rounds)]
        parts.append((share, max(rounds_, key=lambda m: m.samples_per_s)))
    if len(parts) == 1:
        return parts[0][1]
    return replace(parts[0][1], samples_per_s=1.0 / sum(w / m.samples_per_s for w, m in parts),
                   ms_per_step=sum(w * m.ms_per_step for w, m in parts),
                   peak_mem_mb=max(m.peak_mem_mb for _, m in parts))


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


def branches(steps: int, fractions: tuple[float, ...], decay_frac: float) -> list[tuple[float, int, int]]:
    """(fraction, length, branch point) of each cooldown branch, shortest first: the branch
    for length L starts from the stable run's checkpoint at optim.decay_start(L). Lengths
    too short for a stable phase and a decay of at least a step each are left out."""
    out: dict[int, tuple[float, int, int]] = {}
    for f in sorted(fractions):
        length = round(f * steps)
        start = optim.decay_start(length, decay_frac)
        if 1 <= start < length:
            out[length] = (f, length, start)
    return list(out.values())


# ----------------------------------------------------------------------------- sizing
def trial_dir(study: StudyConfig, trial: Trial) -> Path:
    return Path(study.out) / "trials" / trial.name


def size_trial(study: StudyConfig, trial: Trial, reference: float, threads: int,
               d: dist.Dist | None = None, log=print) -> Sizing:
    """Measure the trial and give it its steps: trial.json, so a resumed trial keeps its length
    (a time budget depends on a measurement). Under torchrun rank 0 measures and tells the others
    (or tells them its error)."""
    return dist.on_main(d or dist.Dist(), lambda: _size_trial(study, trial, reference, threads, log))


def _size_trial(study: StudyConfig, trial: Trial, reference: float, threads: int, log) -> Sizing:
    path = trial_dir(study, trial) / "trial.json"
    sizing = finished(path, Sizing, log, "measuring the trial again")
    if sizing is not None:
        return sizing
    run = trial.run
    train_set, val_set, test_set, info = build_datasets(run.data)
    per_sample = train_flops_per_sample(run, info.num_classes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # as many threads as the trial will train with
    try:
        m = measure_trial(run, info.num_classes)  # the plan resolved the model against the data
    finally:
        torch.set_num_threads(before)
    spe = len(train_set) // run.train.batch
    budget = parse_budget(study.budget)
    steps = steps_for(budget, per_sample, run.train.batch, spe, m.samples_per_s, reference)
    if not any(f == max(study.fractions) for f, _, _ in branches(steps, study.fractions, study.decay_frac)):
        raise UserError(f"budget {study.budget!r} is too small to train trial {trial.name} "
                         f"({steps} steps of batch {run.train.batch}) with a stable phase and a cooldown; "
                         "raise --budget")
    # the reported split's size (the binomial noise of the accuracies): test where the data has one
    sizing = Sizing(per_sample, steps, spe, len(test_set) or len(val_set), m.as_dict(), threads,
                    hardware(run.train.device))
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write(path, sizing)
    return sizing


def size_all(study: StudyConfig, trials: list[Trial], reference: float, threads: int,
             log=print) -> dict[str, Sizing]:
    """Every trial sized in one process (a launcher's one job): one node measures them all."""
    return {t.name: _size_trial(study, t, reference, threads, log) for t in trials}


def hardware(device: str = "auto") -> str:
    """What a time budget's throughput was measured on: the GPU's name, else the CPU's model."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{dev.type}: {model}"


def one_hardware(study: StudyConfig, sizes: dict[str, Sizing]) -> None:
    """A time budget's steps come from throughputs measured on one kind of hardware, or not at all."""
    kinds = {s.hardware or "unrecorded hardware" for s in sizes.values()}
    if parse_budget(study.budget).kind == "time" and len(kinds) > 1:
        raise UserError(f"the trials of {study.out!r} were sized on different hardware "
                         f"({'; '.join(sorted(kinds))}), which a time budget cannot compare; remove the "
                         "trials/*/trial.json measured elsewhere and run the study again, or use a compute "
                         "budget")


def _same_hardware(study: StudyConfig, name: str, sizing: Sizing, device: str) -> None:
    """A time budget's run trains on the hardware its steps were measured on (a launcher's node)."""
    if parse_budget(study.budget).kind != "time" or not sizing.hardware:
        return
    here = hardware(device)
    if here != sizing.hardware:
        raise UserError(f"{name}'s time budget was measured on {sizing.hardware}, but this node has {here}; "
                         "run every trial on the hardware that sized them (one Slurm partition or Ray node "
                         "type) or use a compute budget")


def _base(trials: list[Trial]) -> Trial:
    """The trial every strategy scales from (the first, where factor 1 is not among them)."""
    return next((t for t in trials if t.factor == 1), trials[0])


def reference_compute(trials: list[Trial]) -> float:
    """The base model's training multiply-adds per epoch (the unit of compute:Nep budgets)."""
    base = _base(trials)
    train_set, _, _, info = build_datasets(base.run.data)
    per_sample = train_flops_per_sample(base.run, info.num_classes)
    return per_sample * (len(train_set) // base.run.train.batch) * base.run.train.batch


# ----------------------------------------------------------------------------- runs
def _sized(run: RunConfig, study: StudyConfig, length: int, spe: int, seed: int, out: Path,
           **train) -> RunConfig:
    """A wsd run of a trial: epochs and warm-up fixed by the trial's full `length`, so every
    run of one trial (stable, branches) shares them; `train` sets the rest (max_steps, ...)."""
    t = replace(run.train, schedule="wsd", epochs=math.ceil(length / spe), seed=seed,
                warmup_epochs=study.warmup * length / spe, **train)
    return replace(run, train=t, out=str(out))


def _metric(run: RunConfig) -> str:
    return tasks.get(run.task).metric


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
    metric, loss = _reported(final, _metric(run)) if annealed else (_metric(run), "val_loss")
    acc = float(final.get(metric, float("nan")))
    return Point(fraction, steps, samples, samples * sizing.train_flops_per_sample, samples / rate, acc,
                 final.get(loss), results.binomial_stderr(acc, sizing.val_samples), annealed)


def run_seed(study: StudyConfig, trial: Trial, sizing: Sizing, k: int, d: dist.Dist | None = None,
             log=print) -> SeedResult | None:
    """One seed of a trial: the stable run, then a cooldown branch per fraction (seeds after the
    first: the full-length one only); result.json (rank 0: None on the others)."""
    out = trial_dir(study, trial) / f"seed{k}"
    done = out / "result.json"
    found = _seed_result(study, trial, k, log)
    if found is not None:
        return found
    _same_hardware(study, f"trial {trial.name}", sizing, trial.run.train.device)
    t0 = time.perf_counter()
    plan_ = branches(sizing.steps, study.fractions if k == 0 else (max(study.fractions),), study.decay_frac)
    seed, spe = trial.run.train.seed + k, sizing.steps_per_epoch

    def run(name: str, **train) -> RunConfig:
        return _sized(trial.run, study, sizing.steps, spe, seed, out / name, **train)

    stable = run("stable", decay_frac=0.0, max_steps=max(s for _, _, s in plan_),
                 keep_steps=tuple(s for _, _, s in plan_))
    engine.train(stable, log, d)
    rows = engine_rows(Path(stable.out))
    rate = next((r["samples_per_s"] for r in reversed(rows)), sizing.measured["samples_per_s"])
    curve = tuple(_point(r["step"] / sizing.steps, r["step"], trial.run, sizing, r, rate, False)
                  for r in rows)
    points, last = [], None
    for f, length, start in plan_:
        last = run(f"cool-{f:g}", decay_frac=study.decay_frac, max_steps=length,
                   branch_from=str(checkpoint.at(stable.out, start)))
        points.append(_point(f, length, trial.run, sizing, engine.train(last, log, d), rate, True))
    probe = _probe(study, trial, last, seed, log, d) if study.objective == "mae" else None
    if d is not None and not d.main:
        return None
    result = SeedResult(trial.name, seed, tuple(points), curve, time.perf_counter() - t0, rate, probe)
    results.write(done, result)
    return result


def finished(path: Path, cls, log, again: str, **expect):
    """The record of class `cls` a finished step of the study left at `path` (trial.json,
    result.json), or None: not there yet, or damaged, stale, or not the one `expect`ed (field
    values), which a warning names with what happens (`again`)."""
    if not path.is_file():
        return None
    try:
        record = results.read(path, cls)
        wrong = [f"{k} {getattr(record, k)!r}, not {v!r}" for k, v in expect.items()
                 if getattr(record, k) != v]
        if wrong:
            raise StaleResult(f"{path} is of another run ({', '.join(wrong)})")
    except StaleResult as e:
        log(f"warning: {e}; {again}")
        return None
    return record


def _seed_result(study: StudyConfig, trial: Trial, k: int, log) -> SeedResult | None:
    """Seed k of a trial as its result.json has it, if it finished (and the file is whole)."""
    return finished(trial_dir(study, trial) / f"seed{k}" / "result.json", SeedResult, log,
                    "running that seed again (its runs resume from their checkpoints)",
                    trial=trial.name, seed=trial.run.train.seed + k)


def engine_rows(run_dir: Path) -> list[dict]:
    """The validation rows of a run's metrics.jsonl (mid-run evaluations)."""
    return [r for r in engine.read_metrics(run_dir) if r.get("split") == "val"]


def _probe(study: StudyConfig, trial: Trial, pretrained: RunConfig, seed: int, log,
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
    final = engine.train(probe, log, d)
    return float(final[_reported(final, "val_top1")[0]])


def run_sweep_lr(study: StudyConfig, base: Trial, sizing: Sizing, lr: float, d: dist.Dist | None = None,
                 log=print) -> SweepPoint:
    """One run of the learning-rate sweep: the base model at `lr` for sweep_length of its budget."""
    _same_hardware(study, f"the sweep's base at lr {lr:g}", sizing, base.run.train.device)
    steps = max(2, round(study.sweep_length * sizing.steps))
    run = replace(base.run, train=replace(base.run.train, base_lr=lr))
    cfg = _sized(run, study, steps, sizing.steps_per_epoch, run.train.seed,
                 Path(study.out) / SWEEP / f"lr-{lr:g}", decay_frac=study.decay_frac, max_steps=steps)
    t0 = time.perf_counter()
    final = engine.train(cfg, log, d)
    acc = float(final.get(_metric(run), float("nan")))
    return SweepPoint(lr, steps, steps * run.train.batch * sizing.train_flops_per_sample, acc,
                      final.get("val_loss"), results.binomial_stderr(acc, sizing.val_samples),
                      time.perf_counter() - t0)


def pick_lr(points: list[SweepPoint]) -> SweepPoint:
    """The best sweep point: highest accuracy, then lowest loss (NaN runs never win)."""
    ok = [p for p in points if math.isfinite(p.accuracy)] or points
    return max(ok, key=lambda p: (p.accuracy, -(p.loss if p.loss is not None else math.inf)))


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
    saved = out / "study.yaml"

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
    """Refuse a --out that is no study directory (vitscale.rundir: new, empty or holding study.yaml)
    or that lies inside the trials' data."""
    rundir.check_outside(out, base.data)
    rundir.check_out(out, "study", rundir.STUDY)


def run_study(study: StudyConfig, only: str | None = None, log=print):
    """Size, sweep, train what is not finished, then analyse and report (rank 0): the
    summary.Summary, or None where this process only trained (`only`, ranks above 0).

    One process works on a study directory at a time (on one trial's directory, with `only`:
    one job per trial may share the study), rank 0 holding the lock for all ranks. A signal
    stops it with its runs checkpointed (Interrupted)."""
    launch.available(study)  # Slurm without sbatch, a launcher's package missing: before anything is written
    base = base_run(study)
    d = dist.setup(base.train.device)
    log = log if d.main else (lambda *a, **k: None)
    where = Path(study.out) / (SWEEP if only == SWEEP else f"trials/{only}" if only else "")
    try:
        dist.on_main(d, lambda: check_study_dir(study.out, base))  # before the lock, the first write
        with lock.held(where, d, "study directory", log), signals.deferred():
            return _run_study(study, only, log, d)
    except Interrupted as e:
        raise Interrupted(f"{e}; the study's finished runs are kept, its others checkpointed: to continue, "
                          f"run the same command again (or vitscale study --config {study.out}/study.yaml"
                          + (f" --trial {only}" if only else "") + ")") from None
    finally:
        dist.teardown(d)


def _run_study(study: StudyConfig, only: str | None, log, d: dist.Dist):
    from vitscale import analysis, study_report

    out = dist.on_main(d, lambda: _prepare(study))
    trials = plan(study)
    names = [t.name for t in trials]
    if only and only not in (*names, SWEEP):
        raise UserError(f"no trial named {only!r}; the trials are: {', '.join(names)}, and {SWEEP}")
    reference = reference_compute(trials)
    in_epochs = parse_budget(study.budget).in_epochs
    unit = f"; a base-model epoch is {reference:.3g} multiply-adds" if in_epochs else ""
    log(f"study: {len(trials)} trials ({', '.join(names)}), budget {study.budget} per trial{unit}, "
        f"{study.param}, cooldowns at {', '.join(f'{f:g}' for f in sorted(study.fractions))} of each budget")
    if study.launcher != "local" and d.enabled:
        raise UserError(f"--launcher {study.launcher} starts the study's jobs itself; run it without "
                         "torchrun")
    runner = launcher_for(study, 1 if only or d.enabled else study.pool_size, log,
                          base_run(study).train.device)
    try:
        wanted = trials if not only or only == SWEEP else [t for t in trials if t.name in ("base", only)]
        sizes = {}
        todo = [t for t in wanted if not (trial_dir(study, t) / "trial.json").is_file()]
        if runner.remote and todo:  # one job on one node measures every trial, before any trains
            runner.map([("sizing", size_all, (study, todo, reference, runner.threads), out / "sizing.log")],
                       lambda name, got: sizes.update(got))
        for t in wanted:
            if t.name not in sizes:
                sizes[t.name] = size_trial(study, t, reference, runner.threads, d, log)
            signals.check("while sizing the trials")
        one_hardware(study, sizes)
        base = _base(trials)
        sweep = _sweep(study, base, sizes[base.name], runner, log, d, run=not only or only == SWEEP)
        if only == SWEEP:
            return None
        lr = pick_lr(sweep).lr if sweep else None
        trials = plan(study, lr)
        if only:
            trials = [t for t in trials if t.name == only]
            runner.map([_job(study, t, sizes[t.name], k, d) for t in trials for k in range(study.seeds)],
                       lambda name, r: None)
            return None
        done = _collect(study, trials, sizes, runner, log, d)
    finally:
        runner.close()
    if not d.main:
        return None
    rows = [done[t.name] for t in trials]
    summary = analysis.summarize(study, rows, sweep)
    study_report.write(out, summary, rows)
    return summary


def _sweep(study: StudyConfig, base: Trial, sizing: Sizing, runner: Launcher, log, d: dist.Dist,
           run: bool) -> list[SweepPoint]:
    """The learning-rate sweep on the base model (resumable; skipped when lrs is empty)."""
    if not study.lrs:
        return []
    points = read_sweep(study, log)
    if points is not None:
        return points
    path = Path(study.out) / SWEEP / "sweep.json"
    if not run:
        raise UserError(f"the learning-rate sweep of {study.out!r} has not finished; run "
                         f"`vitscale study --config {Path(study.out) / 'study.yaml'} --trial {SWEEP}` first")
    got: dict[float, SweepPoint] = {}
    jobs = [(f"sweep lr {lr:g}", run_sweep_lr, (study, base, sizing, lr, d),
             Path(study.out) / SWEEP / f"lr-{lr:g}" / "log.txt") for lr in study.lrs]
    runner.map(jobs, lambda name, p: got.__setitem__(p.lr, p))
    points = [got[lr] for lr in study.lrs]
    if d.main:
        atomic_write_text(path, json.dumps([results.to_dict(p) for p in points], indent=2))
    best = pick_lr(points)
    log("sweep: " + ", ".join(f"lr {p.lr:g} {100 * p.accuracy:.1f}%" for p in points)
        + f"; every trial trains at base_lr {best.lr:g}")
    if best.lr in (min(study.lrs), max(study.lrs)) and len(study.lrs) > 2:
        log(f"warning: the best learning rate {best.lr:g} is at the edge of the sweep; widen --lrs")
    return points


def read_sweep(study: StudyConfig, log) -> list[SweepPoint] | None:
    """The finished learning-rate sweep (sweep.json), [] with no lrs, None if not finished."""
    if not study.lrs:
        return []
    path = Path(study.out) / SWEEP / "sweep.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            points = [results.from_dict(SweepPoint, p, str(path)) for p in saved]
            if sorted(p.lr for p in points) == sorted(study.lrs):
                return points
        except (OSError, ValueError, TypeError) as e:  # StaleResult, a cut file, not a list of records
            log(f"warning: {path} cannot be read ({e}); running the sweep again (its runs resume)")
    return None


def _job(study: StudyConfig, trial: Trial, sizing: Sizing, k: int, d: dist.Dist) -> tuple:
    log_path = trial_dir(study, trial) / f"seed{k}" / "log.txt"
    return (f"{trial.name} seed {k}: {_describe(trial, sizing)}", run_seed, (study, trial, sizing, k, d),
            log_path)


def _collect(study: StudyConfig, trials: list[Trial], sizes: dict[str, Sizing], runner: Launcher,
             log, d: dist.Dist) -> dict[str, TrialResult]:
    """Seed 0 of every trial, then the other seeds of the leading trials; results.jsonl as they land."""
    seeds: dict[str, dict[int, SeedResult]] = {t.name: {} for t in trials}
    by_name = {t.name: t for t in trials}

    def done(name: str, r: SeedResult | None) -> None:
        if r is None:
            return
        seeds[r.trial][r.seed - by_name[r.trial].run.train.seed] = r
        _write_results(study, trials, sizes, seeds)
        log(f"{name.split(':')[0]}: accuracy {100 * r.final.accuracy:.1f}% "
            f"(annealed: {', '.join(f'{100 * p.accuracy:.1f}' for p in r.points)}), {r.wall_s:.0f} s")

    for phase in range(2):
        if phase == 1:
            ranked = sorted(trials, key=lambda t: -_chosen_by(seeds[t.name][0]))
            rows = [_trial_result(t, sizes[t.name], seeds[t.name]) for t in trials]
            held = {r.name for rs in held_out(rows, study.families, study.holdout).values() for r in rs}
            leaders = ranked if study.leaders == 0 else ranked[:study.leaders]
            chosen = [t for t in ranked if t in leaders or t.name in held]
            units = [(t, k) for t in chosen for k in range(1, study.seeds)]
        else:
            units = [(t, 0) for t in trials]
        jobs = []
        for t, k in units:
            found = _seed_result(study, t, k, log)
            if found is not None:
                seeds[t.name][k] = found
                continue
            jobs.append(_job(study, t, sizes[t.name], k, d))
        if len(jobs) < len(units):
            log(f"{len(units) - len(jobs)} trial seeds finished before, not re-run")
        runner.map(jobs, done)
    return _write_results(study, trials, sizes, seeds)


def held_out(rows: list[TrialResult], strategies: tuple[str, ...],
             holdout: int) -> dict[str, list[TrialResult]]:
    """Each strategy's (family's) `holdout` largest trials by training compute, then by size (never
    a base): what the backtest predicts, so they run every seed."""
    out = {}
    for s in strategies:
        members = [r for r in rows if s in r.strategies and not is_base(r.name)]
        top = max((r.compute for r in members), default=0.0)  # equal budgets differ by a step's rounding
        members.sort(key=lambda r: (r.compute >= top * 0.99, r.flops))
        out[s] = members[len(members) - holdout:] if holdout else []
    return out


def _trial_result(t: Trial, sizing: Sizing, seeds: dict[int, SeedResult]) -> TrialResult:
    c = cost(t.run.model)
    return TrialResult(t.name, t.strategies, t.factor, t.achieved, config.to_dict(t.run.model), c.params,
                       c.flops, c.acts, t.run.train.batch, t.run.train.base_lr, sizing.steps,
                       sizing.train_flops_per_sample, sizing.measured, sizing.val_samples,
                       tuple(seeds[k] for k in sorted(seeds)))


def _write_results(study: StudyConfig, trials: list[Trial], sizes: dict[str, Sizing],
                   seeds: dict[str, dict[int, SeedResult]]) -> dict[str, TrialResult]:
    rows = {t.name: _trial_result(t, sizes[t.name], seeds[t.name]) for t in trials if 0 in seeds[t.name]}
    atomic_write_text(Path(study.out) / "results.jsonl",
                      "".join(json.dumps(r.row()) + "\n" for r in rows.values()))
    return rows


def _describe(t: Trial, sizing: Sizing) -> str:
    m = t.run.model
    return (f"depth {m.depth} width {m.width} heads {m.heads} {m.hw[0]}px"
            + (f" {m.frames} frames" if m.frames > 1 else "")
            + f", {t.achieved:.2f}x flops, {sizing.steps} steps")


# ----------------------------------------------------------------------------- files
def dump_study(study: StudyConfig) -> str:
    """study.yaml: without `out`, as a study directory is where it is (moved, it continues there)."""
    return config.dump_yaml(study, leave_out=("out",))


def load_study(path: str | Path) -> StudyConfig:
    return config.load_yaml(path, StudyConfig)
