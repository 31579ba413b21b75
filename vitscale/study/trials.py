"""A study's trials: the plan (one trial per strategy and factor, from the base), each trial's size
under the budget (steps from its measured or counted cost), its cooldown branches, the held-out
trials of the backtest."""

from __future__ import annotations

import contextlib
import logging
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vitscale import tasks
from vitscale.common import dist, records
from vitscale.common.device import pick_device
from vitscale.common.errors import UserError
from vitscale.cost import measure
from vitscale.cost.scaling import scale_family
from vitscale.data import build_datasets
from vitscale.models.vit import ViTConfig
from vitscale.study import results
from vitscale.study.config import (
    TRIAL,
    Budget,
    StudyConfig,
    base_run,
    is_base,
    parse_recipes,
)
from vitscale.study.rates import Rates
from vitscale.study.results import Sizing, TrialResult, finished
from vitscale.train import inputs, optim
from vitscale.train.config import RunConfig
from vitscale.train.flops import sample_shapes, train_flops_per_sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trial:
    name: str  # "base", or STRATEGY-xFACTOR
    strategies: tuple[str, ...]  # the families it belongs to (the base belongs to all)
    factor: float  # the flops factor asked for
    achieved: float  # the flops factor reached
    run: RunConfig  # the trial's run config (before the budget sets its length)
    rates: Rates | None = None  # the sweep's rates by length (None: run.train.base_lr, whatever the length)

    def lr(self, steps: int) -> float:
        """The base_lr it trains at for `steps` steps: the sweep's rate for that length, or its run's."""
        return self.rates.at(steps) if self.rates is not None else self.run.train.base_lr


def plan(study: StudyConfig, lr: Rates | None = None,
         extra: Mapping[str, tuple[float, ...]] | None = None) -> list[Trial]:
    """The trials: one per distinct scaled config (factor 1 is one shared base), then the same
    under each recipe (base+NAME, STRATEGY+NAME-xFACTOR). Under muP every config is parametrised
    relative to its base; `lr`: the sweep's rates, each trial's by its length (Trial.lr).
    `extra[family]`: factors bracketing added to a family (bracket.py), each dropped where the
    scaler cannot reach it."""
    plain = base_run(study)
    train_set, _, _, info = build_datasets(plain.data)
    if len(train_set) < plain.train.batch:  # an epoch of no step: every budget would be 0
        raise UserError(f"the training split of {plain.data.name} holds {len(train_set)} items, fewer than "
                        f"a batch of {plain.train.batch}; lower --train.batch or give the study more data")
    trials: dict[tuple[str, ViTConfig], Trial] = {}
    for recipe, overrides in {"": (), **parse_recipes(study)}.items():
        run = records.apply_overrides(plain, list(overrides))
        base = inputs.resolve(run, info).model
        if study.param == "mup":
            base = base.replace(param="mup", base_width=base.width, base_depth=base.depth,
                                base_head_dim=base.width // base.heads)
        tag = f"+{recipe}" if recipe else ""
        for strategy in study.strategies:
            try:
                family = scale_family(base, strategy, list(study.factors))
            except UserError as e:
                raise UserError(f"recipe {recipe!r} with strategy {strategy}: {e}") from None
            for f in (extra or {}).get(strategy + tag, ()):
                with contextlib.suppress(UserError):  # beyond what the scaler reaches: the family stops
                    family += scale_family(base, strategy, [f])
            for s in family:
                key = (recipe, s.config)
                if key in trials:
                    t = trials[key]
                    if strategy + tag not in t.strategies:  # an extra factor may land on a planned shape
                        trials[key] = replace(t, strategies=(*t.strategies, strategy + tag))
                    continue
                name = f"base{tag}" if s.config == base else f"{strategy}{tag}-x{s.target:g}"
                data = replace(run.data, image_size=s.config.hw[0], frames=s.config.frames)
                trials[key] = Trial(name, (strategy + tag,), s.target, s.achieved,
                                    replace(run, model=s.config, data=data), lr)
    return list(trials.values())


class _Labelled(torch.nn.Module):
    """A task module called as model(x) for the benchmark step (labels held fixed)."""

    def __init__(self, module: torch.nn.Module, y: torch.Tensor):
        super().__init__()
        self.module, self.y = module, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.y)


def measure_trial(run: RunConfig, num_classes: int, rounds: int = 3) -> measure.Measurement:
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
        x = measure.example_input(run.model.replace(frames=frames, image_size=side), run.train.batch, device)
        rounds_ = [measure.measure_model(model, x, "train", run.train.dtype, warmup=1, iters=3,
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


def sized_run(run: RunConfig, study: StudyConfig, length: int, spe: int, seed: int, out: Path,
              **train) -> RunConfig:
    """A wsd run of a trial: epochs and warm-up fixed by the trial's full `length`, so every
    run of one trial (stable, branches) shares them; `train` sets the rest (max_steps, ...)."""
    t = replace(run.train, schedule="wsd", epochs=math.ceil(length / spe), seed=seed,
                warmup_epochs=study.warmup * length / spe, **train)
    return replace(run, train=t, out=str(out))


def metric(run: RunConfig) -> str:
    """The task's metric a run is scored by (val_top1 for classification)."""
    return tasks.get(run.task).metric


# ----------------------------------------------------------------------------- sizing
def trial_dir(study: StudyConfig, trial: Trial) -> Path:
    return Path(study.out) / "trials" / trial.name


def size_trial(study: StudyConfig, trial: Trial, reference: float, threads: int,
               d: dist.Dist | None = None) -> Sizing:
    """Measure the trial and give it its steps: trial.json, so a resumed trial keeps its length
    (a time budget depends on a measurement). Under torchrun rank 0 measures and tells the others
    (or tells them its error)."""
    return dist.on_main(d or dist.Dist(), lambda: _size_trial(study, trial, reference, threads))


def _size_trial(study: StudyConfig, trial: Trial, reference: float, threads: int) -> Sizing:
    path = trial_dir(study, trial) / TRIAL
    sizing = finished(path, Sizing, "measuring the trial again")
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
    budget = study.parsed_budget
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


def size_all(study: StudyConfig, trials: list[Trial], reference: float, threads: int) -> dict[str, Sizing]:
    """Every trial sized in one process (a launcher's one job): one node measures them all."""
    return {t.name: _size_trial(study, t, reference, threads) for t in trials}


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
    if study.parsed_budget.kind == "time" and len(kinds) > 1:
        raise UserError(f"the trials of {study.out!r} were sized on different hardware "
                         f"({'; '.join(sorted(kinds))}), which a time budget cannot compare; remove the "
                         "trials/*/trial.json measured elsewhere and run the study again, or use a compute "
                         "budget")


def _same_hardware(study: StudyConfig, name: str, sizing: Sizing, device: str) -> None:
    """A time budget's run trains on the hardware its steps were measured on (a launcher's node)."""
    if study.parsed_budget.kind != "time" or not sizing.hardware:
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


def held_out(rows: list[TrialResult], strategies: tuple[str, ...],
             holdout: int) -> dict[str, list[TrialResult]]:
    """Each strategy's (family's) `holdout` largest trials by training compute, then by size (never
    a base): what the backtest predicts, so they run every seed. `rows`: trial results, or the
    plan's rows (preview.PlannedTrial), which carry the same name, strategies, compute and flops."""
    out = {}
    for s in strategies:
        members = [r for r in rows if s in r.strategies and not is_base(r.name)]
        top = max((r.compute for r in members), default=0.0)  # equal budgets differ by a step's rounding
        members.sort(key=lambda r: (r.compute >= top * 0.99, r.flops))
        out[s] = members[len(members) - holdout:] if holdout else []
    return out
