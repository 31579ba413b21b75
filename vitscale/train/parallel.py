"""How a run's module is spread over its ranks: replicated (DDP) or sharded (FSDP), compiled if
asked, and the places that must know which: gradient accumulation (DDP all-reduces only on the
last micro-batch), evaluation (an FSDP root gathers its own parameters first) and checkpoints
(`is_sharded`, `unwrapped`: only a sharded module needs DCP's state-dict functions).

torch.distributed.fsdp (~1.3 s to import) is imported only by a run that shards.
"""

from __future__ import annotations

import contextlib
import sys

import torch

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
        # Imported here, not at the top: a run that does not shard (every one-process run) need
        # not pay for torch.distributed.fsdp.
        from torch.distributed.fsdp import fully_shard

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
    if not _is_fsdp(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _fsdp():
    """torch.distributed.fsdp if this process has imported it, else None: a process that has not
    has no FSDP module, and need not pay the import to learn so."""
    return sys.modules.get("torch.distributed.fsdp")


def _is_fsdp(module: torch.nn.Module) -> bool:
    """Whether `module` itself is an FSDP (fully_shard) module."""
    fsdp = _fsdp()
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP shards `module` or any module inside it (inside DDP's or torch.compile's
    wrapper too): then only DCP's state-dict functions know how to gather and set its state."""
    fsdp = _fsdp()
    return fsdp is not None and any(
        isinstance(m, (fsdp.FSDPModule, fsdp.FullyShardedDataParallel)) for m in module.modules())


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's and torch.compile's wrappers (either, both or neither), whose
    state dict is keyed by the parameters' own names (no `module.` or `_orig_mod.` prefix)."""
    while True:
        inner = compat.uncompiled(module)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        if inner is module:
            return module
        module = inner


def no_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last accumulation step."""
    inner = compat.uncompiled(module)
    if not sync and isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()
