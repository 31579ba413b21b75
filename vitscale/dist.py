"""Distributed set-up for torchrun: gloo on CPU, NCCL on CUDA; rank 0 logs and saves.

    torchrun --nproc_per_node 4 -m vitscale train ...
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m vitscale train ...

Without torchrun's environment everything here is a single-process no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from vitscale.bench import pick_device


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


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.enabled and td.is_initialized():
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


def broadcast_object(d: Dist, obj):
    """Rank 0's value of a picklable object on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
