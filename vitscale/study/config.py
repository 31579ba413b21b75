"""A study's config: StudyConfig (study.yaml), its budget and target parsed once (Budget), the
recipes it runs, the demo's settings (on the built-in data only) and the base run every trial
scales from."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from vitscale.common import records
from vitscale.common.errors import UserError
from vitscale.cost.scaling import parse_strategy
from vitscale.study import launch_args
from vitscale.train import config, inputs
from vitscale.train.config import RunConfig

OBJECTIVES = ("supervised", "mae")


SWEEP = "sweep"  # --trial sweep runs the learning-rate sweep alone

# A study directory's files (its config, study.yaml, is vitscale.common.rundir.STUDY):
#   trials/NAME/trial.json   a trial's measured size      trials/NAME/seedK/result.json  a seed's points
#   sweep/sweep.json         the learning-rate sweep      results.jsonl   every trial, a line each
#   summary.json, report.md, report.html                  the analysis
TRIAL = "trial.json"
SEED_RESULT = "result.json"
SWEEP_RESULT = "sweep.json"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


LAUNCHERS = ("local", "slurm", "ray")


@dataclass(frozen=True)
class StudyConfig:
    model: str = "pico/4"  # the base preset every strategy scales from

    # scaling strategies, as `vitscale scale` takes them. d and w by default: r and t (and their
    # share of d1_w8_r1) change the token count, across which muP does not carry the learning rate,
    # so the rates swept on the base would not suit their trials: they need --lrs '' (no sweep)
    strategies: tuple[str, ...] = ("d", "w")

    # flops factors of the trials relative to the base (1 = the base): on both sides of it, since
    # under a fixed budget a larger model trains fewer steps and may lose to a smaller one
    factors: tuple[float, ...] = (0.5, 1.0, 2.0)

    # extra factors a family may add outward (half its smallest, twice its largest) while its best
    # seed-0 trial sits at an edge of its sizes, so that its optimum is bracketed (0 = the factors only)
    bracket: int = 1

    # what every trial may spend: epochs:N (N epochs each), compute:Nep (what the base spends in N
    # epochs), compute:MACS (multiply-adds) or time:90s (wall time; also 2m, 1h). Equal compute
    # compares shapes at equal cost
    budget: str = "compute:8ep"
    objective: str = "supervised"  # supervised, or mae: MAE pre-training, then a linear probe scores it

    # mup: every trial parametrised in muP relative to the base, so that one learning rate swept on
    # the base suits every shape; sp: the standard parametrisation
    param: str = "mup"

    # base_lr values swept on the base model at two lengths, each trial then trained at the rate for
    # its length (doubling steps span a wide range in few runs); empty (--lrs '') = no sweep: every
    # trial at its train.base_lr
    lrs: tuple[float, ...] = (4e-3, 8e-3, 1.6e-2)

    # the sweep's lengths as shares of the shortest and the longest trial's steps: LRs ranked at half cost
    sweep_length: float = 0.5

    # cooldown branch points as shares of each trial's budget: each is an annealed point on the
    # trial's curve, branched from one stable run, from which the fits are made. Over a decade and
    # more (C/16 to C): IsoFLOP slices at five computes for the cost of one run and its cooldowns
    # (about 0.4 of a run), and two fitted points (1/8, 1/4; lawfit.FIT_FROM) for the backtest across compute
    fractions: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0)
    decay_frac: float = 0.2  # a cooldown's share of the run length it ends (the decay of a wsd schedule)
    warmup: float = 0.05  # linear warm-up as a share of each trial's full length

    # seeds of the leading and the held-out trials, whose noise matters most; every other trial
    # runs seed 0 only, and seeds after the first run only the full-length cooldown
    seeds: int = 2
    leaders: int = 1  # how many trials, best first by seed 0, run every seed (0 = all trials)
    holdout: int = 1  # each strategy's largest trials the backtest holds out and predicts (0 = no backtest)
    target: str = ""  # the budget to recommend for: compute:MACS or time:10m ("" = the study's budget)
    ahead: tuple[float, ...] = (2.0, 10.0, 100.0)  # larger budgets, as multiples of the study's, to predict

    # train the recommended model at the budget (two seeds) and report it against its prediction
    verify: bool = True
    verify_ahead: tuple[float, ...] = ()  # also the law's pick at these multiples of the budget (e.g. 2)
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
            (self.bracket >= 0, "bracket must be 0 (the factors only) or more"),
            (self.workers >= 0, "workers must be 0 (auto) or more"),
            (self.launcher in LAUNCHERS,
             f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}"),
            (self.holdout >= 0, "holdout must be 0 (no backtest) or more"),
            (all(m > 0 for m in self.ahead), "ahead must be positive multiples of the budget, e.g. 2,10,100"),
            (all(m > 1 for m in self.verify_ahead),
             "verify_ahead must be multiples of the budget above 1, e.g. 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for s in self.strategies:
            parse_strategy(s)
        # each parsed once, here, and kept: a bad budget or target is refused before anything runs
        target = self.parsed_budget and self.parsed_target
        if target and (target.kind == "epochs" or target.in_epochs):
            raise UserError(f"target {self.target!r}: give a compute (compute:3e12) or time (time:10m) "
                             "budget")
        if any(o.lstrip("-").startswith("train.multigrid=") and o.partition("=")[2] for o in self.overrides):
            raise UserError("train.multigrid cannot be set for a study's trials yet (its steps take varying "
                            "numbers of samples, which the study does not size); leave it out")
        parse_recipes(self)
        tokens = [s for s in self.strategies if {"r", "t"} & set(parse_strategy(s))]
        if tokens and self.lrs:
            raise UserError(f"strategy {tokens[0]} changes the token count, across which the learning rate "
                            "swept on the base does not carry (muP carries it across width and depth only); "
                            "study it with --lrs '' and a --train.base_lr for every trial, or leave it out")
        launch_args.options(self.launcher, self.launcher_args)  # typed and in range, before anything starts

    @cached_property
    def parsed_budget(self) -> Budget:
        """`budget` parsed: what every trial may spend (its text stays the field, as study.yaml has it)."""
        return parse_budget(self.budget)

    @cached_property
    def parsed_target(self) -> Budget | None:
        """`target` parsed (None: recommend for the study's own budget)."""
        return parse_budget(self.target, "target") if self.target else None

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
            records.apply_overrides(plain, list(overrides))
        except UserError as e:
            raise UserError(f"recipe {name!r}: {e}") from None
        out[name] = overrides
    return out


def recipe_names(study: StudyConfig) -> tuple[str, ...]:
    return tuple(text.partition(":")[0] for text in study.recipes)


# ----------------------------------------------------------------------------- planning
# The demo's trial settings (`make demo`), for a study on its default data only: the generated
# cluttered digits, a fixed epoch of 16,384, a validation split of 2,000 (it only ranks: learning
# rates, leaders, bracketing; the fits read the 10,000 test items) and batch 128 (a CPU's step
# costs the smallest trials more in overhead than in arithmetic: 128 trains them 1.3-1.7x faster
# per sample than 32).
# DEMO_SHAPE is for the default base alone: 16 px (16 tokens at pico/4's patch 4), width 32 in
# heads of 8 channels, so that w keeps the head size at every factor (16 = 2x8, 24 = 3x8, 48 = 6x8).
# Half pico's width: at the demo's compute the best model is far smaller than pico (in the demo at
# width 64, w-x0.25 and d-x0.25 beat the base by 4.5 points), and a family's optimum is bracketed only where
# its factors reach around it; at width 32 the depth family's best, depth 2, has a worse neighbour
# on each side. Another base on the demo's data keeps its own shape and the data's native 32 px (a
# patch-16 preset at 16 px would see one token).
DEMO_MODEL, DEMO_SHAPE = "pico/4", ("data.image_size=16", "model.width=32", "model.heads=4")
DEMO_DATA = "cluttered-digits"


DEMO = ("data.name=cluttered-digits", "data.scale_min=1", "data.train_size=16384", "data.val_size=2000",
        "train.batch=128")


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
    settings on the demo's data, the study's overrides; its input shape decided (train.inputs.settle)."""
    recipe = config.recipe("pretrain" if study.objective == "mae" else "train")
    overrides = [*demo_settings(study), *study.overrides]
    cfg = records.apply_overrides(config.with_preset(recipe, study.model), overrides)
    return inputs.settle(replace(cfg, out=""))


def is_base(name: str) -> bool:
    """Whether a trial is a base: the study's (base) or a recipe's (base+NAME)."""
    return name == "base" or name.startswith("base+")


# ----------------------------------------------------------------------------- files
def dump_study(study: StudyConfig) -> str:
    """study.yaml: without `out`, as a study directory is where it is (moved, it continues there)."""
    return records.dump_yaml(study, leave_out=("out",))


def load_study(path: str | Path) -> StudyConfig:
    return config.load_yaml(path, StudyConfig)
