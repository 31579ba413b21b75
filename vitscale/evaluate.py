"""Evaluation after each epoch: the machinery (sharded outputs, top-k, k-NN) each task's
metrics are built from (vitscale.tasks), and the call that runs them.

Every rank evaluates an equal, padded shard of the data (FSDP needs every rank in every
forward pass); padded duplicates are dropped before anything is counted.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitscale import dist
from vitscale.data import DataInfo, make_loader, skipped_files
from vitscale.device import autocast
from vitscale.errors import UserError


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
def outputs(fn, dataset, cfg, d: dist.Dist, log=None) -> tuple[Tensor, Tensor]:
    """Run fn(x) over a dataset (eval transforms) -> (outputs, labels), gathered over ranks.

    Unreadable files are left out and named through `log`; fn runs on every batch, even one
    with no item left (B = 0: every rank takes part in every forward pass).
    """
    micro = max(1, cfg.train.batch // (d.world * cfg.train.accum))
    loader = make_loader(dataset, _shard(len(dataset), d), micro, cfg.data.workers, d.device.type)
    outs, labels, skipped = [], [], []
    for batch in loader:
        mine = batch["index"] % d.world == d.rank  # not a padded duplicate
        with autocast(d.device, cfg.train.dtype), quiet(not len(mine)):
            outs.append(fn(batch["x"].to(d.device)).float()[mine.to(d.device)])
        labels.append(batch["y"][mine].to(d.device))
        skipped += batch["skipped"]
    if skipped and log:
        log(f"evaluation: {skipped_files(skipped)}")
    out, y = _gather(d, torch.cat(outs)), _gather(d, torch.cat(labels))
    if not len(y):
        raise UserError(f"none of the {len(dataset)} files to evaluate on could be read (the log names "
                         "them); fix them, or set data.val_path to readable data")
    return out, y


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
    log: Callable | None = None  # names the unreadable files left out
    picture: Path | None = None  # where a task that draws its outputs draws them; None: nowhere


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


def top_k(logits: Tensor, y: Tensor, k: int) -> float:
    """Share of samples whose label is among their k highest logits ([N, classes], [N])."""
    return float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())
