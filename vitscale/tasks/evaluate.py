"""Evaluation after each epoch: the machinery (sharded outputs, top-k, k-NN) each task's
metrics are built from (vitscale.tasks), and the call that runs them.

Every rank evaluates an equal, padded shard of the data (FSDP needs every rank in every
forward pass); padded duplicates are dropped before anything is counted.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitscale.common import dist, signals
from vitscale.common.device import autocast
from vitscale.common.errors import Interrupted, UserError
from vitscale.data import DataInfo, close, make_loader, skipped_files
from vitscale.data.views import Views, distinct, parse_views

logger = logging.getLogger(__name__)


def _shard(n: int, d: dist.Dist) -> list:
    """This rank's eval keys (index, None), padded to equal length by wrapping around.

    A padded key's index is another rank's (p - n is not p modulo world when padding is
    needed), so `index % world == rank` tells this rank's real items from padding.
    """
    padded = -(-n // d.world) * d.world
    return [(p % n, None) for p in range(d.rank, padded, d.world)]


def _gather(d: dist.Dist, x: Tensor) -> Tensor:
    """Concatenate a tensor's rows from every rank (equal row counts not required)."""
    if not d.enabled:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(d.world)]
    td.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    rows = int(max(sizes))
    pad = torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(pad) for _ in range(d.world)]
    td.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


@torch.no_grad()
def outputs(fn, dataset, cfg, d: dist.Dist) -> tuple[Tensor, Tensor]:
    """Run fn(x) over a dataset (eval transforms) -> (outputs, labels), gathered over ranks.

    Unreadable files are left out and named in the log; fn runs on every batch, even one
    with no item left (B = 0: every rank takes part in every forward pass).
    """
    return indexed_outputs(fn, dataset, cfg, d)[:2]


@torch.no_grad()
def indexed_outputs(fn, dataset, cfg, d: dist.Dist) -> tuple[Tensor, Tensor, Tensor]:
    """`outputs`, and each row's item index (rows are in rank order, not index order)."""
    micro = max(1, cfg.train.batch // (d.world * cfg.train.accum))
    batches = iter(make_loader(dataset, _shard(len(dataset), d), micro, cfg.data.workers, d.device.type))
    outs, labels, indexes, skipped = [], [], [], []
    signalled = signals.count()
    try:
        for batch in batches:
            mine = batch["index"] % d.world == d.rank  # not a padded duplicate
            with autocast(d.device, cfg.train.dtype), quiet(not len(mine)):
                outs.append(fn(batch["x"].to(d.device)).float()[mine.to(d.device)])
            labels.append(batch["y"][mine].to(d.device))
            indexes.append(batch["index"][mine].to(d.device))
            skipped += batch["skipped"]
            stop_if_signalled(d, signalled)
    finally:
        close(batches)  # its workers stop now, not when a traceback holding them is collected
    if skipped:
        logger.info(f"evaluation: {skipped_files(skipped)}")
    out, y, index = (_gather(d, torch.cat(t)) for t in (outs, labels, indexes))
    if not len(y):
        raise UserError(f"none of the {len(dataset)} files to evaluate on could be read (the log names "
                         "them); fix them, or set data.val_path to readable data")
    return out, y, index


def stop_if_signalled(d: dist.Dist, before: int) -> None:
    """Raise Interrupted on every rank if a signal came to any since `signals.count()` was
    `before` (within `signals.deferred()`, as a run is): an evaluation stops after the batch it is
    on, not thousands of items later; the run says where it resumes from (engine). A signal that
    came before the evaluation began (in an epoch's last step) lets it finish: the run stops after it."""
    if dist.any_rank(d, signals.count() > before):
        raise Interrupted(f"{signals.received() or 'a signal to another rank'} during evaluation")


def merge_views(logits: Tensor, y: Tensor, item: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per item, the log of the mean softmax over its views (VideoMAE's test score) -> ([M, K], [M]).

    logits: [R, K] one row per view, y: [R] labels, item: [R] item ids in 0 .. n-1, in any
    order; the M items with at least one row come out in id order. Computed as a log-sum-exp
    (no softmax underflows to 0); one view gives its log_softmax.
    """
    logp = F.log_softmax(logits.float(), dim=1)  # [R, K]
    k = logp.shape[1]
    top = logp.new_full((n, k), -torch.inf).scatter_reduce_(0, item[:, None].expand(-1, k), logp, "amax")
    sums = logp.new_zeros(n, k).index_add_(0, item, (logp - top[item]).exp())  # [n, K]
    count = torch.bincount(item, minlength=n)  # [n] views per item
    seen = count > 0
    labels = y.new_zeros(n).index_copy_(0, item, y)  # every view of an item has its label
    return (sums[seen].log() + top[seen] - count[seen, None].float().log()), labels[seen]


def view_scores(fn, dataset, views: tuple[int, int], cfg, d: dist.Dist) -> tuple[Tensor, Tensor]:
    """Class scores of `fn` (logits) per item of `dataset` over clips x crops test views ->
    ([N, K], [N] labels): the log of the mean softmax over the item's views; with one view that
    differs on the data (`data.views.distinct`), its plain logits (as `outputs`)."""
    clips, crops = distinct(dataset, *views)
    if (clips, crops) != views:
        logger.info(f"data.test_views={views[0]}x{views[1]}: only {clips}x{crops} of them differ on this "
                    f"data, so {clips}x{crops} are scored (a generated clip is exactly data.frames long and "
                    "square; an image has one instant)")
    if clips * crops == 1:
        return outputs(fn, dataset, cfg, d)
    logits, y, flat = indexed_outputs(fn, Views(dataset, clips, crops), cfg, d)
    return merge_views(logits, y, flat % len(dataset), len(dataset))


def quiet(empty: bool):
    """Silence what a model says about a batch of none (e.g. a variance over no samples)."""
    return warnings.catch_warnings(action="ignore") if empty else contextlib.nullcontext()


def knn_top1(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, k: int,
             temperature: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (as DINO evaluates features)."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    correct = 0
    for chunk in range(0, val_f.shape[0], 256):
        sim, idx = (val_f[chunk:chunk + 256] @ train_f.T).topk(min(k, train_f.shape[0]), dim=1)  # [b, k]
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == val_y[chunk:chunk + 256]).sum())
    return correct / val_f.shape[0]


@dataclass(frozen=True)
class Context:
    """What a task's metrics are computed from besides its module."""

    cfg: Any  # the RunConfig
    train_set: Dataset
    val_set: Dataset  # what is scored
    info: DataInfo
    d: dist.Dist
    picture: Path | None = None  # where a task that draws its outputs draws them; None: nowhere
    views: tuple[int, int] = (1, 1)  # clips x crops a classifier's item is scored over (view_scores)


def evaluate(task, module: nn.Module, ctx: Context, prefix: str = "") -> dict:
    """The task's metrics of `module` ({} with no validation data), with the same random draws
    (e.g. MAE's masks) every time. `prefix` names the metrics of other weights than the trained
    ones ("ema_": ema_val_top1 ...)."""
    if not len(ctx.val_set):
        return {}
    module.eval()
    d = ctx.d
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(ctx.cfg.train.seed + 1)
        result = task.metrics(module, ctx)
    return {prefix + k: v for k, v in result.items()}


def evaluate_test(task, module: nn.Module, ctx: Context, test_set: Dataset, prefix: str = "") -> dict:
    """The task's metrics of `module` on the test split, named for it (val_top1 -> test_top1,
    val_loss -> test_loss, knn_top1 -> test_knn_top1; {} with no test data), a classifier's over
    data.test_views views per item. Reported, never selected on: nothing chooses by them."""
    views = parse_views(ctx.cfg.data.test_views)
    result = evaluate(task, module, replace(ctx, val_set=test_set, picture=None, views=views))
    return {prefix + test_name(k): v for k, v in result.items()}


def test_name(metric: str) -> str:
    """The test split's name of a held-out metric: val_top1 -> test_top1, knn_top1 -> test_knn_top1."""
    return "test_" + metric.removeprefix("val_")


def top_k(logits: Tensor, y: Tensor, k: int) -> float:
    """Share of samples whose label is among their k highest logits ([N, classes], [N])."""
    return float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())
