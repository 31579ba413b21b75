"""Evaluation after each epoch: top-1, validation loss, k-NN accuracy, MAE pictures.

Every rank evaluates an equal, padded shard of the data (FSDP needs every rank in every
forward pass); padded duplicates are dropped before anything is counted.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale import dist, visual
from vitscale.data import make_loader, skipped_files
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


def evaluate(cfg, module: nn.Module, train_set, val_set, info, d: dist.Dist, epoch: int,
             run_dir: Path, log=None, prefix: str = "") -> dict:
    """Metrics for the task after an epoch ({} with no validation data); MAE also writes a
    reconstruction picture. `log` names the unreadable files left out. `prefix` names the
    metrics of other weights than the trained ones ("ema_": ema_val_top1 ...; no picture)."""
    if not len(val_set):
        return {}
    result = _evaluate(cfg, module, train_set, val_set, info, d, epoch, run_dir, log, picture=not prefix)
    return {prefix + k: v for k, v in result.items()}


def top_k(logits: Tensor, y: Tensor, k: int) -> float:
    """Share of samples whose label is among their k highest logits ([N, classes], [N])."""
    return float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())


def _evaluate(cfg, module, train_set, val_set, info, d, epoch, run_dir, log, picture: bool) -> dict:
    module.eval()
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed + 1)  # the same masks every evaluation
        if cfg.task != "mae":
            logits, y = outputs(module.predict, val_set, cfg, d, log)
            top5 = {"val_top5": top_k(logits, y, 5)} if logits.shape[1] > 5 else {}  # else always 1
            return {"val_top1": top_k(logits, y, 1), **top5, "val_loss": float(F.cross_entropy(logits, y))}
        # one row per sample holding its batch's mean loss: the mean over rows weights batches by size
        losses, _ = outputs(lambda x: module(x, None).reshape(1).expand(x.shape[0]), val_set, cfg, d, log)
        result = {"val_loss": float(losses.mean())}
        if cfg.train.knn_k and info.num_classes > 1:
            train_f, train_y = outputs(module.predict, train_set, cfg, d, log)
            val_f, val_y = outputs(module.predict, val_set, cfg, d, log)
            result["knn_top1"] = knn_top1(train_f, train_y, val_f, val_y, cfg.train.knn_k)
        items = [it for it in map(val_set.__getitem__, range(min(32, len(val_set)))) if it][:8]
        if items and picture:  # the first readable items
            pictures = module.mae.reconstruct(torch.stack([it["x"] for it in items]).to(d.device))
            if d.main:
                visual.reconstructions(pictures, info, run_dir / f"recon-epoch{epoch + 1:03d}.png")
    return result


def score(result: dict) -> float | None:
    """Higher is better: top-1, else k-NN top-1, else minus the validation loss; None with no
    validation data (then the latest checkpoint is the best)."""
    for key in ("val_top1", "knn_top1"):
        if key in result:
            return result[key]
    return -result["val_loss"] if "val_loss" in result else None
