"""Distributed set-up for torchrun: gloo on CPU, NCCL on CUDA; rank 0 logs and saves.

    torchrun --nproc_per_node 4 -m vitscale train ...
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m vitscale train ...

Without torchrun's environment everything here is a single-process no-op. torchrun's
environment is read here alone: the rest of vitscale is handed a `Dist`.

A rank waiting on another (a collective, or `on_main` while rank 0 works) gives up after
TIMEOUT with an error that names rank 0, instead of waiting forever on a rank that failed.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td

from vitscale.common.device import pick_device
from vitscale.common.errors import StopTraining, UserError

TIMEOUT = timedelta(minutes=30)  # the longest a rank waits for the others (rank 0 sizing a trial, saving)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _torchrun() -> bool:
    """Launched by torchrun, even as its only process: a group of one rank then stands, so that
    FSDP (train.fsdp, which needs a group) runs on one GPU as on many."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (if any; torchrun of one process: a group of one)
    and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if (world > 1 or _torchrun()) and not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    """Leave the process group. The run's objects left in reference cycles (an FSDP module and its
    hooks, with the collectives' work handles it keeps) are freed first, while the group and the
    interpreter still stand: freed at interpreter exit instead, gloo's threads have been seen to
    abort the process (SIGABRT after a finished run, about 1 in 10 two-rank runs on a loaded CPU)."""
    if (d.enabled or _torchrun()) and td.is_initialized():
        gc.collect()
        td.destroy_process_group()


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks."""
    if d.enabled:
        value = value.clone()
        td.all_reduce(value)
        value /= d.world
    return value


def total(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks."""
    if d.enabled:
        value = value.clone()
        td.all_reduce(value)
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        td.barrier()


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if it is true on any (ranks agree, e.g. to stop at the same step)."""
    if not d.enabled:
        return flag
    value = torch.tensor(float(flag), device=d.device)
    td.all_reduce(value, op=td.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(d: Dist, obj):
    """Rank 0's value of a picklable object on every rank (an error after TIMEOUT)."""
    if not d.enabled:
        return obj
    box = [obj]
    try:
        td.broadcast_object_list(box, src=0)
    except RuntimeError as e:  # a timeout or a lost peer (DistBackendError)
        raise StopTraining(f"rank {d.rank}: no answer from rank 0 within {TIMEOUT} ({type(e).__name__}); "
                           "rank 0's output says why") from e
    return box[0]


def gather_object(d: Dist, obj) -> list | None:
    """Every rank's value of a picklable object, in rank order, on rank 0 (None elsewhere)."""
    if not d.enabled:
        return [obj]
    box = [None] * d.world if d.main else None
    td.gather_object(obj, box, dst=0)
    return box


def on_main(d: Dist, fn):
    """fn() run by rank 0 alone, its value (or its error) on every rank: no rank waits forever
    on one that failed, and a user's mistake ends every rank with the same one line."""
    if not d.enabled:
        return fn()
    outcome = (None, None)
    if d.main:
        try:
            outcome = (fn(), None)
        except (UserError, StopTraining) as e:
            outcome = (None, e)
        except Exception as e:
            broadcast_object(d, (None, StopTraining(f"rank 0 failed: {type(e).__name__}: {e}")))
            raise
    value, error = broadcast_object(d, outcome)
    if error is not None:
        raise error
    return value
