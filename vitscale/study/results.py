"""What a scaling study measures, as typed, versioned records written as JSON.

    SweepPoint    one learning rate of the base-model sweep, annealed at its end
    Point         one evaluation of one seed of a trial: annealed (a cooldown branch's end)
                  or mid-run (the stable run's, for plots only)
    SeedResult    one seed of one trial: its annealed points and its mid-run curve
    TrialResult   a trial: its shape and cost, its sizing, every seed

The study writes them, the analysis and the report read them back with `read`. A file
written by another version of these records is never misread: `read` raises
`StaleResult`, and the study re-runs what it describes (its runs resume from their
checkpoints, so that costs little) or refuses with one line.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from vitscale.common import records

logger = logging.getLogger(__name__)

VERSION = 2  # 1: the untyped rows of the first study (mid-run curves, one seed, no sweep)


# A result file of another version or kind (or not a result file at all): the codec's refusal.
StaleResult = records.StaleRecord


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent samples."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n > 0 else float("nan")


@dataclass(frozen=True)
class Point:
    """One evaluation of one seed of a trial."""

    fraction: float  # share of the trial's full length trained (1 = the whole budget)
    steps: int  # optimizer steps
    samples: int  # training samples seen (steps x batch)
    compute: float  # training multiply-adds spent (samples x forward+backward per sample)
    seconds: float  # training time at the trial's measured throughput
    accuracy: float  # top-1 (or the objective's metric): on test for an annealed point where the data
    # has a test split, else on val (mid-run points are always val)
    loss: float | None  # the loss on the same split
    stderr: float  # binomial standard error of `accuracy` on that split
    annealed: bool  # the end of a cooldown (true) or a mid-run evaluation at full LR (false)


@dataclass(frozen=True)
class SeedResult:
    """One seed of one trial: stable run + one cooldown branch per fraction."""

    trial: str
    seed: int  # the train.seed this seed ran with
    points: tuple[Point, ...]  # annealed points, one per fraction, shortest first
    curve: tuple[Point, ...]  # mid-run (not annealed) evaluations of the stable run: plots only
    wall_s: float  # wall time of this seed's runs
    train_samples_per_s: float  # training throughput the engine measured in the stable run
    probe_accuracy: float | None = None  # MAE objective: linear probe of the full-length encoder
    halved: int = 0  # times its learning rate was halved after a loss that was not finite (0 or 1)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a seed result has at least one point")

    @property
    def final(self) -> Point:
        return self.points[-1]


@dataclass(frozen=True)
class TrialResult:
    """A trial of the study: what it is, what it cost, what each seed reached."""

    name: str  # "base" or STRATEGY-xFACTOR
    strategies: tuple[str, ...]  # families it belongs to (the base belongs to all)
    factor: float  # flops factor asked for
    achieved: float  # flops factor reached
    model: dict  # the ViTConfig as a plain dict
    params: int
    flops: float  # forward multiply-adds per sample
    acts: float
    batch: int
    lr: float  # base_lr the trial trained with (the sweep's pick under mup)
    steps: int  # optimizer steps of the full budget
    train_flops_per_sample: float  # forward + backward multiply-adds per sample
    measured: dict  # bench.Measurement of a training step (best of 3 rounds)
    val_samples: int  # the reported split's size (test where the data has one; the binomial noise)
    seeds: tuple[SeedResult, ...]

    @property
    def family(self) -> str:
        """"base", or the first strategy the trial belongs to."""
        return "base" if self.name == "base" else self.strategies[0]

    @property
    def samples(self) -> int:
        return self.steps * self.batch

    @property
    def compute(self) -> float:
        return self.samples * self.train_flops_per_sample

    @property
    def accuracies(self) -> list[float]:
        """Final accuracy of each seed (the linear probe's for the MAE objective)."""
        return [s.probe_accuracy if s.probe_accuracy is not None else s.final.accuracy for s in self.seeds]

    @property
    def accuracy(self) -> float:
        """Mean final accuracy over seeds."""
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def stderr(self) -> float:
        """Binomial standard error of the mean final accuracy (seeds pooled)."""
        return binomial_stderr(self.accuracy, self.val_samples * len(self.seeds))

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.seeds)

    def points(self) -> list[Point]:
        """Annealed points averaged over seeds, one per fraction (what the fits use)."""
        by_fraction: dict[float, list[Point]] = {}
        for s in self.seeds:
            for p in s.points:
                by_fraction.setdefault(p.fraction, []).append(p)
        out = []
        for f, ps in sorted(by_fraction.items()):
            acc = sum(p.accuracy for p in ps) / len(ps)
            losses = [p.loss for p in ps if p.loss is not None]
            out.append(Point(f, ps[0].steps, ps[0].samples, ps[0].compute, ps[0].seconds, acc,
                             sum(losses) / len(losses) if losses else None,
                             binomial_stderr(acc, self.val_samples * len(ps)), True))
        return out

    def row(self) -> dict:
        """The results.jsonl line: the record plus its derived figures."""
        return to_dict(self) | {"samples": self.samples, "compute": self.compute, "accuracy": self.accuracy,
                                "accuracies": self.accuracies, "stderr": self.stderr, "wall_s": self.wall_s}


@dataclass(frozen=True)
class Sizing:
    """How long a trial trains and what one step costs; trial.json, so a resumed trial keeps its length."""

    train_flops_per_sample: float  # forward + backward multiply-adds per sample (FlopCounterMode)
    steps: int  # optimizer steps of the full budget
    steps_per_epoch: int
    val_samples: int  # validation set size
    measured: dict  # bench.Measurement of a training step: best of 3 rounds
    threads: int  # torch threads the measurement ran with (the trial trains with as many)
    hardware: str = ""  # what measured it (study.hardware: the GPU's or CPU's model; "" before it was kept)

    def __post_init__(self) -> None:
        rate = self.measured.get("samples_per_s")
        if min(self.steps, self.steps_per_epoch, self.val_samples) < 1 or not (
                isinstance(rate, (int, float)) and rate > 0):
            raise ValueError("steps, steps_per_epoch, val_samples and measured samples_per_s must be > 0")


@dataclass(frozen=True)
class SweepPoint:
    """One learning rate of the sweep on the base model (a short wsd run, annealed)."""

    lr: float  # base_lr (per 256 samples)
    steps: int
    compute: float  # training multiply-adds of the run
    accuracy: float
    loss: float | None
    stderr: float
    wall_s: float


# ----------------------------------------------------------------------------- JSON
# The study's records go through the one codec (vitscale.common.records) at this VERSION.
def to_dict(record, version: int = VERSION) -> dict:
    """A record as plain JSON-able data, tagged with its kind and version."""
    return records.encode(record, version)


def from_dict(cls, data: dict, where: str = "result", version: int = VERSION):
    """Rebuild a record; StaleResult if it is of another kind or version."""
    return records.decode(cls, data, version, where)


def write(path: Path, record, version: int = VERSION) -> None:
    records.write_json(path, record, version)


def read(path: Path, cls, version: int = VERSION):
    """Read a record of class `cls`; StaleResult on another kind or version, or a bad file."""
    return records.read_json(path, cls, version)


def finished(path: Path, cls, again: str, **expect):
    """The record of class `cls` a finished step of the study left at `path` (trial.json,
    result.json), or None: not there yet, or damaged, stale, or not the one `expect`ed (field
    values), which a warning names with what happens (`again`)."""
    if not path.is_file():
        return None
    try:
        record = read(path, cls)
        wrong = [f"{k} {getattr(record, k)!r}, not {v!r}" for k, v in expect.items()
                 if getattr(record, k) != v]
        if wrong:
            raise StaleResult(f"{path} is of another run ({', '.join(wrong)})")
    except StaleResult as e:
        logger.warning(f"{e}; {again}")
        return None
    return record
