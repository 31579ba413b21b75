"""What a scaling study concludes, as typed, versioned records: summary.json.

    Forecast        the law fitted on the points at or below C/4, checked on every trial at C
    Backtest        the law fitted without each strategy's largest trials, checked on them
    Recommendation  the model and length for the budget (and for larger budgets), from the
                    law refitted on every trial, beside the best trial measured
    Verification    the recommended model trained at its budget: predicted against measured
    IsoFlop         trials compared at equal training compute, measured and predicted
    Valley          one family's trials at one compute: is its best bracketed, and where the
                    parabola through them peaks
    SizeScaling     a family's optimal size against compute, from its valleys, beside the law's
    Summary         all of it, with the noise, the law, the sweep and the runtime model

`read` gives back a Summary or raises results.StaleResult (vitscale.common.records' codec).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vitscale.common import records
from vitscale.models.vit import ViTConfig
from vitscale.study.fits import Laws, RuntimeModel
from vitscale.study.results import SweepPoint

# 2: the law's gamma (a larger model learns more per sample); 3: the forecast across compute, the flags;
# 4: where each family's optimum sits (valleys.py), the pick verified
VERSION = 4
LEVEL = 0.9  # the coverage every interval claims


@dataclass(frozen=True)
class Noise:
    """How much one measured accuracy moves between runs."""

    seed_sd: float  # standard deviation of one seed's final accuracy (seeds and validation sampling)
    dof: int  # degrees of freedom of that estimate (0: no trial had two seeds; binomial only)
    binomial: float  # validation sampling alone (typical point)

    def sd(self, seeds: int = 1) -> float:
        """Noise of a mean over `seeds` seeds."""
        return self.seed_sd / seeds**0.5


@dataclass(frozen=True)
class Check:
    """One held-out trial: the law's prediction against what it measured."""

    strategy: str
    trial: str
    flops: float
    samples: int
    predicted: float
    interval: tuple[float, float]  # for the measured value: the fit's spread plus measurement noise
    measured: float  # mean final accuracy over its seeds
    noise: float  # measurement noise of `measured`
    seeds: int
    error: float  # predicted - measured
    covered: bool


@dataclass(frozen=True)
class Structure:
    """Shared or separate laws, chosen by leave-one-trial-out error on the trials fitted."""

    shared: bool  # one law for every strategy (an exponent each), or one law per strategy
    error_shared: float | None  # mean absolute error predicting each trial's final accuracy from the others
    error_separate: float | None  # the same for separate laws (None: they could not be fitted)


@dataclass(frozen=True)
class Backtest:
    held_out: tuple[str, ...]
    fitted_on: tuple[str, ...]
    law: Laws | None
    structure: Structure | None
    checks: tuple[Check, ...]
    mean_abs_error: float | None
    max_abs_error: float | None
    covered: int  # checks whose interval held the measured value
    note: str  # what could not be backtested, and why


@dataclass(frozen=True)
class Flag:
    """A trial the law should not take at its word (diagnose.py): why, in a sentence's words."""

    trial: str
    kind: str  # "short", "unstable" or "not improving"
    detail: str
    left_out: bool = False  # of the fits (diagnose.py says which flags do this)


@dataclass(frozen=True)
class ForecastCheck:
    """One trial at its full budget, predicted from the points at or below a share of it."""

    trial: str
    strategy: str
    flops: float
    samples: int  # at the full budget
    early: float  # its accuracy at the largest fraction fitted (what persistence ranks by)
    predicted: float  # the law's
    interval: tuple[float, float]
    measured: float  # mean final accuracy over its seeds
    loglinear: float | None  # its own points' line in log samples, extended (None: fewer than two)
    covered: bool
    loss_first: float | None = None  # the law of loss and its map to accuracy (lossfirst.py)


@dataclass(frozen=True)
class Forecast:
    """The backtest across compute: fitted at or below `cut` of each budget, checked at the budget;
    the pick's regret beside persistence's and the log-linear extension's."""

    cut: float
    points: int  # annealed points fitted
    checks: tuple[ForecastCheck, ...]
    mean_abs_error: float | None
    max_abs_error: float | None
    covered: int
    pick: str | None  # the trial the law predicts best at the budget
    regret: float | None  # best measured at the budget less the pick's measured accuracy
    persistence: str | None  # the best at the cut
    persistence_regret: float | None
    loglinear_pick: str | None
    loglinear_regret: float | None
    loglinear_mean_abs_error: float | None
    loglinear_max_abs_error: float | None
    note: str  # why it could not be made
    loss_first_pick: str | None = None  # the same forecast, the law fitted on loss first (lossfirst.py)
    loss_first_regret: float | None = None
    loss_first_mean_abs_error: float | None = None
    loss_first_max_abs_error: float | None = None
    loss_first_note: str = ""  # why it could not be made, or the parameters its law left at a bound


@dataclass(frozen=True)
class Candidate:
    """A shape and a length: the law's best for a budget, or a measured trial."""

    strategy: str
    name: str  # trial name when measured, STRATEGY-xFACTOR when predicted
    factor: float  # flops over the base
    model: ViTConfig  # its shape (summary.json: the config's fields, as config.yaml's model section)
    params: int
    flops: float  # forward multiply-adds per sample
    steps: int
    samples: int
    compute: float  # training multiply-adds
    seconds: float  # training time (measured throughput, or the runtime model's for a prediction)
    accuracy: float
    interval: tuple[float, float]  # predicted: for one training run; measured: +-1.645 noise
    extrapolation: bool  # beyond the sizes or lengths the law was fitted on
    multiple: float = 1.0  # of the study's budget
    bounds: tuple[str, ...] = ()  # the law's parameters at a bound this prediction rests on


@dataclass(frozen=True)
class Recommendation:
    budget: str  # what the budget is, in words
    compute: float | None  # training multiply-adds (compute and epochs budgets)
    seconds: float | None  # training time (time budgets)
    pick: Candidate | None  # the law's recommendation: the cheapest of `tied`
    best: Candidate | None  # the law's most accurate candidate
    tied: tuple[Candidate, ...]  # the law's candidates (one per strategy) within noise of `best`
    measured: Candidate  # the measured pick: the cheapest of `measured_tied`
    measured_best: Candidate  # the most accurate measured point within the budget
    measured_tied: tuple[Candidate, ...]
    ahead: tuple[Candidate, ...]  # the law's best at larger budgets
    note: str = ""  # what to read into it with care


@dataclass(frozen=True)
class Verification:
    """The law's pick for a budget (a multiple of the study's), trained there and measured."""

    multiple: float  # of the study's budget
    trial: str  # what measured it: trials/verify-NAME, or a trial of the study with its shape
    strategy: str
    steps: int
    predicted: float
    interval: tuple[float, float]  # the prediction's, for one training run
    measured: tuple[float, ...]  # each seed's final accuracy
    mean: float
    covered: bool  # the mean inside the interval
    trained: bool  # false: a trial of the study had measured that shape at the budget


@dataclass(frozen=True)
class IsoFlop:
    """Trials at one training compute (annealed points; interpolated in log compute
    between a trial's neighbouring points where none falls on it)."""

    compute: float
    trials: tuple[str, ...]
    strategies: tuple[str, ...]
    flops: tuple[float, ...]
    samples: tuple[float, ...]
    measured: tuple[float, ...]
    predicted: tuple[float | None, ...]  # the law's, at the same size and length
    best: str  # the measured optimum
    law_best: str  # the law's optimum over every shape of every strategy (STRATEGY-xFACTOR)
    law_best_flops: float | None


@dataclass(frozen=True)
class Valley:
    """One family's trials at one training compute (interpolated as an IsoFlop's), by size."""

    family: str
    compute: float
    trials: tuple[str, ...]  # smallest first
    flops: tuple[float, ...]
    measured: tuple[float, ...]
    best: str
    bracketed: bool  # the best has a neighbour on each side worse by more than the noise
    edge: str  # "" where bracketed, else where the best sits or what is unresolved
    optimum: float | None  # N_opt: where a parabola in log size through them peaks (bracketed only)


@dataclass(frozen=True)
class SizeScaling:
    """N_opt ~ compute^slope for one family: from its bracketed valleys (Hoffmann et al.'s approach
    2), beside the law's frontier over the same computes (approach 3)."""

    family: str
    valleys: int  # bracketed valleys the slope rests on
    slope: float | None  # None below two
    interval: tuple[float, float] | None  # LEVEL interval (three or more valleys)
    law_slope: float | None
    note: str  # where the two disagree, or why there is no slope


@dataclass(frozen=True)
class FrontierPoint:
    """The law's best shape and length for a strategy at one compute."""

    strategy: str
    compute: float
    factor: float
    flops: float
    samples: float
    accuracy: float


@dataclass(frozen=True)
class Parameter:
    name: str
    value: float
    interval: tuple[float, float]


@dataclass(frozen=True)
class Runtime:
    pearson_flops: float
    pearson_params: float
    pearson_acts: float
    model: RuntimeModel | None
    loo_errors: tuple[float, ...]  # relative error of each config predicted by a fit to the others
    note: str


@dataclass(frozen=True)
class Sweep:
    points: tuple[SweepPoint, ...]
    lr: float  # the base trial's rate (rates.Rates.at its steps)
    compute: float
    trials_compute: float
    share: float
    wall_s: float
    lengths: tuple[int, ...] = ()  # the lengths swept (rates.Rates), shortest first
    best: tuple[float, ...] = ()  # the best rate at each
    exponent: float = 0.0  # d log rate / d log steps between them


@dataclass(frozen=True)
class Growth:
    strategy: str
    trials: tuple[str, ...]
    acts_exponent: float  # acts ~ flops^exponent along the family


@dataclass(frozen=True)
class Summary:
    budget: str
    budget_kind: str
    objective: str
    param: str
    metric: str
    fit_metric_note: str
    strategies: tuple[str, ...]
    trials: int
    total_wall_s: float
    noise: Noise
    flags: tuple[Flag, ...]
    forecast: Forecast
    backtest: Backtest
    law: Laws | None  # fitted on every trial
    structure: Structure | None
    parameters: tuple[Parameter, ...]  # the law's, with bootstrap intervals
    recommendation: Recommendation
    verified: tuple[Verification, ...]  # the pick (and verify_ahead's) trained and measured
    frontier: tuple[FrontierPoint, ...]
    isoflops: tuple[IsoFlop, ...]
    valleys: tuple[Valley, ...]
    scaling: tuple[SizeScaling, ...]
    sweep: Sweep | None
    runtime: Runtime
    growth: tuple[Growth, ...]


def write(path: Path, summary: Summary) -> None:
    records.write_json(path, summary, VERSION)


def read(path: Path) -> Summary:
    return records.read_json(path, Summary, VERSION)


def as_json(summary: Summary) -> str:
    return json.dumps(records.encode(summary, VERSION), indent=2)
