"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time"): the weights of several runs
fine-tuned from one initialisation, averaged into one model.

    vitscale soup RUN_A RUN_B RUN_C --out runs/soup [--greedy]

uniform  the mean of every ingredient's weights.
greedy   the paper's recipe 1: ingredients sorted by validation top-1, best first; each is
         added in turn if the soup with it scores no lower on validation than the soup
         without it, else left out.

Soups are chosen on the validation split and reported on the test split (`data.build_datasets`):
the greedy choice never sees test.

Ingredients must be one model: the same task (one that ranks by val_top1), architecture (the
model config but drop_path, a training setting), data and split (the data config but its
augmentation and loading), and initialisation: the same resolved --init path, or, for runs
that start from random weights (no --init, or --init random), the same train.seed, which
draws them. Training settings (learning rate, augmentation, seed, length) may differ: that is
what makes ingredients. An ingredient's weights are what `--init RUN` reads from it: its best/
checkpoint (the epoch its validation chose), its EMA weights where it trained with train.ema.
Floating-point tensors are averaged (in float64, stored in their own dtype); integer buffers
(a BatchNorm's num_batches_tracked) are the first ingredient's.

The output directory is a new (or empty) run directory, so a soup made before is never replaced:
config.yaml of the first ingredient, the chosen soup as best/. `vitscale eval DIR`, `--init DIR`
and `vitscale convert DIR` read it as a run.
soup.json holds every ingredient's and soup's validation and test metrics.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vitscale import tasks
from vitscale.common import checkpoint, dist, rundir
from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text
from vitscale.common.records import to_dict
from vitscale.data import build_datasets
from vitscale.tasks import evaluate
from vitscale.train.config import RunConfig
from vitscale.train.rundir import RunDir

logger = logging.getLogger(__name__)

# What ingredients may set apart: training settings, not what the model or its data is.
MODEL_MAY_DIFFER = {"drop_path"}
DATA_MAY_DIFFER = {"train_size", "scale_min", "real_scale_min", "hflip", "randaugment", "color_jitter",
                   "erase_prob", "repeated_aug", "workers", "strict", "test_views"}


@dataclass(frozen=True)
class Ingredient:
    run: Path  # the run directory
    checkpoint: Path  # the checkpoint its weights come from (best/, else the newest whole one)
    ema: bool  # the weights are the checkpoint's EMA (train.ema)
    state: dict[str, Tensor]  # the task module's state dict


def identity(cfg: RunConfig) -> dict:
    """What every ingredient of a soup must share, flat: the task, the architecture and its
    class count (model but MODEL_MAY_DIFFER), the data and its split (data but DATA_MAY_DIFFER)."""
    d = to_dict(cfg)
    return ({"task": cfg.task}
            | {f"model.{k}": v for k, v in d["model"].items() if k not in MODEL_MAY_DIFFER}
            | {f"data.{k}": v for k, v in d["data"].items() if k not in DATA_MAY_DIFFER})


def initialisation(cfg: RunConfig) -> str:
    """Where a run's weights started: its --init, resolved, or (from random weights) the seed
    that drew them."""
    if cfg.init in ("", "random"):
        return f"random weights of train.seed={cfg.train.seed}"
    return f"--init {Path(cfg.init).expanduser().resolve()}"


def check(runs: Sequence[tuple[str, RunConfig]]) -> None:
    """Refuse, in one line, runs that are not one model from one initialisation."""
    (first, base), *rest = runs
    task = tasks.get(base.task)
    if task.metric != "val_top1":
        raise UserError(f"{first!r} is a {base.task} run, ranked by {task.metric}; a soup averages "
                         "classifiers chosen by val_top1 (finetune, supervised, linprobe runs)")
    for run, cfg in rest:
        mine, theirs = identity(base), identity(cfg)
        key = next((k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)), None)
        if key is not None:
            raise UserError(f"cannot soup {run!r} with {first!r}: {key} is {theirs.get(key)!r} there, "
                             f"{mine.get(key)!r} in {first!r}; a soup averages runs of one architecture "
                             "and task on one data")
        if initialisation(cfg) != initialisation(base):
            raise UserError(f"cannot soup {run!r} with {first!r}: they start from different weights "
                             f"({initialisation(cfg)}, {initialisation(base)}); a soup averages runs "
                             "fine-tuned from one initialisation")


def read(run: str, shapes: dict[str, torch.Size]) -> Ingredient:
    """A run's soup weights: its best/ checkpoint's (else its newest whole one's), the EMA where
    it has one, as `--init RUN` reads it."""
    run_dir = RunDir(run)
    try:
        found = run_dir.checkpoint(shapes)
    except checkpoint.Damaged as e:
        raise UserError(str(e)) from None
    if found is None:
        raise UserError(f"{run!r} has no checkpoint yet; train it first")
    ema = found.ema is not None
    return Ingredient(run_dir.path, found.path, ema, found.ema if ema else found.model)


def average(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The mean of state dicts: floating-point tensors averaged (in float64, kept in their own
    dtype), the rest (integer buffers) the first's."""
    first = states[0]
    return {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
                if v.is_floating_point() else v.clone()) for k, v in first.items()}


def greedy(order: Sequence[int], accuracy: Callable[[list[int]], float]) -> tuple[list[int], float, list]:
    """Wortsman et al.'s greedy soup (recipe 1) over ingredients `order`ed best first by their own
    validation accuracy: `accuracy(members)` scores the soup of `members`. Returns (members,
    their soup's accuracy, the trace: (ingredient, the soup's accuracy with it, admitted))."""
    members = [order[0]]
    best = accuracy(members)
    trace = [(order[0], best, True)]
    for i in order[1:]:
        tried = accuracy([*members, i])
        admitted = tried >= best  # "does not fall": ties are admitted, as in the paper
        trace.append((i, tried, admitted))
        if admitted:
            members, best = [*members, i], tried
    return members, best, trace


def soup(runs: Sequence[str], out: str, use_greedy: bool = False, device: str = "auto") -> dict:
    """Cook the soup of `runs` into run directory `out`; returns what soup.json holds."""
    configs = _configs(runs, out)
    check(configs)
    base = configs[0][1]
    task = tasks.get(base.task)
    d = dist.setup(device)
    try:
        train_set, val_set, test_set, info = build_datasets(base.data)
        if not len(val_set):
            raise UserError(f"{runs[0]!r} has no validation data (data.val_fraction=0); a soup is chosen "
                             "on the validation split")
        if not len(test_set):
            logger.warning("the data holds no test split (data.test_path / data.test_fraction): soups are "
                           "reported on validation, which also chose them")
        module = tasks.build(base, info.num_classes)
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        ingredients = [read(run, shapes) for run in runs]
        module.to(d.device)
        ctx = evaluate.Context(base, train_set, val_set, info, d)

        def metrics(state: dict[str, Tensor], test: bool = True) -> dict:
            module.load_state_dict(state)
            result = evaluate.evaluate(task, module, ctx)
            return result | (evaluate.evaluate_test(task, module, ctx, test_set) if test else {})

        rows = [metrics(ing.state) for ing in ingredients]
        uniform = average([ing.state for ing in ingredients])
        result = {"ingredients": [{"run": str(ing.run), "checkpoint": str(ing.checkpoint),
                                   "weights": "ema" if ing.ema else "model"} | row
                                  for ing, row in zip(ingredients, rows, strict=True)],
                  "uniform": metrics(uniform)}
        chosen, name = uniform, "uniform"
        if use_greedy:
            order = sorted(range(len(runs)), key=lambda i: -rows[i][task.metric])  # stable: ties keep order
            members, _, trace = greedy(order, lambda m: metrics(average([ingredients[i].state for i in m]),
                                                                test=False)[task.metric])
            chosen, name = average([ingredients[i].state for i in members]), "greedy"
            result["greedy"] = {"members": [str(ingredients[i].run) for i in members],
                                "trace": [{"run": str(ingredients[i].run), task.metric: acc, "admitted": ok}
                                          for i, acc, ok in trace]} | metrics(chosen)
        result["saved"] = name
        if d.main:
            _write(Path(out), ingredients[0], chosen, result, task.score(result[name]))
        return result
    finally:
        dist.teardown(d)


def table(result: dict):
    """A rich table: each ingredient's and soup's validation and test top-1 (and the weights used)."""
    from rich.table import Table

    t = Table(title="model soup (chosen on val, reported on test)", title_justify="left")
    for header in ("", "weights", "val top-1", "test top-1"):
        t.add_column(header, justify="left" if header in ("", "weights") else "right")

    def pct(row: dict, key: str) -> str:
        return f"{100 * row[key]:.2f}" if key in row else "-"

    for ing in result["ingredients"]:
        t.add_row(ing["run"], f"{ing['weights']} of {Path(ing['checkpoint']).name}/", pct(ing, "val_top1"),
                  pct(ing, "test_top1"))
    n = len(result["ingredients"])
    t.add_row("uniform soup", f"mean of {n}", pct(result["uniform"], "val_top1"),
              pct(result["uniform"], "test_top1"))
    if "greedy" in result:
        g = result["greedy"]
        t.add_row("greedy soup", f"mean of {len(g['members'])}", pct(g, "val_top1"), pct(g, "test_top1"))
    return t


def verdict(result: dict) -> str:
    """One line: the saved soup against the ingredient validation would pick, on test."""
    pick = max(result["ingredients"], key=lambda r: r["val_top1"])  # the first of equals
    soup_row, key = result[result["saved"]], "test_top1" if "test_top1" in pick else "val_top1"
    gain = soup_row[key] - pick[key]
    return (f"{result['saved']} soup {key} {100 * soup_row[key]:.2f}% vs the best ingredient by val "
            f"({pick['run']}) {100 * pick[key]:.2f}%: {'+' if gain >= 0 else ''}{100 * gain:.2f} points")


def _configs(runs: Sequence[str], out: str) -> list[tuple[str, RunConfig]]:
    """Each run's config.yaml; a missing run, a run given twice, or --out among them refused, and
    an --out that is not a new or empty folder (vitscale.common.rundir) or lies inside the data."""
    if not runs:
        raise UserError("give the runs to soup: vitscale soup RUN RUN ... --out DIR")
    seen: dict[Path, str] = {}
    for run in runs:
        if not RunDir(run).is_run():
            raise UserError(f"{run!r} is not a run directory (no {rundir.RUN})")
        where = Path(run).resolve()
        if where in seen:
            raise UserError(f"{run!r} is given twice (as {seen[where]!r}); give each ingredient once")
        seen[where] = run
    if Path(out).resolve() in seen:
        raise UserError(f"--out {out!r} is one of the ingredients; choose a new directory")
    rundir.check_out(out, "soup", marker=None)  # new or empty: a soup made before is never replaced
    configs = [(run, RunDir(run).config()) for run in runs]
    rundir.check_outside(out, configs[0][1].data)
    return configs


def _write(out: Path, first: Ingredient, state: dict[str, Tensor], result: dict, score: float | None) -> None:
    """The soup as a run directory (config.yaml, best/) and soup.json, each written atomically."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {str(out)!r}: {e.strerror}; choose another --out") from None
    made, ingredient = RunDir(out), RunDir(first.run)
    atomic_write_text(made.config_file, ingredient.config_file.read_text())
    if ingredient.classes_file.is_file():  # the ingredients' classes, by name
        atomic_write_text(made.classes_file, ingredient.classes_file.read_text())
    ckpt = checkpoint.save(out, 0, state, {"state": {}, "param_groups": []},
                           {"step": 0, "best": score, "soup": result["saved"]}, keep_last=1)
    checkpoint.publish_best(out, ckpt)
    shutil.rmtree(ckpt)  # best/ is the soup; no checkpoint a training run could take to resume
    atomic_write_text(out / rundir.SOUP, json.dumps(result, indent=2))
