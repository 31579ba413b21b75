"""How a run's module is spread over its ranks: replicated (DDP) or sharded (FSDP), compiled if
asked, and the two places the loop must know which: gradient accumulation (DDP all-reduces only
on the last micro-batch) and evaluation (an FSDP root gathers its own parameters first).
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard

from vitscale.common import compat, dist
from vitscale.common.errors import UserError
from vitscale.train.config import RunConfig


def wrap(module: torch.nn.Module, cfg: RunConfig, d: dist.Dist) -> torch.nn.Module:
    """Wrap for data parallel (DDP) or sharded (FSDP) training, then compile if asked."""
    wrapped = module
    if cfg.train.fsdp:
        if not (d.enabled or torch.distributed.is_initialized()):  # torchrun of one process has a group
            raise UserError("--train.fsdp needs several processes: launch with torchrun --nproc_per_node "
                            "N, or on one process add --train.fsdp=false"
                            + (" --train.sharded_ckpt=false" if cfg.train.sharded_ckpt else ""))
        for block in module.encoder.blocks:
            fully_shard(block)
        fully_shard(module)
    elif d.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


@contextlib.contextmanager
def unsharded(module: torch.nn.Module):
    """Gather an FSDP root's own parameters for calls that bypass its forward (evaluation).

    Blocks sharded on their own gather themselves when called; only the root's parameters
    (embeddings, final norm, head) need this.
    """
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def no_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last accumulation step."""
    inner = compat.uncompiled(module)
    if not sync and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()
