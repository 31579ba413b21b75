"""Every random generator a training run draws from: the state a checkpoint keeps of them, and
the seed of each rank's own stream.

A run resumed from a checkpoint draws what it would have drawn had it never stopped (its masks,
drop-path, mixup) because these states are saved with the weights and set back before the next
step.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """The seed of what rank `rank` draws while training (masks, drop-path, mixup): a stream of
    its own, so ranks do not draw alike, and none equal to another seed's (seed + 1, rank 0)."""
    return int(np.random.SeedSequence([seed & (2**63 - 1), rank]).generate_state(1, np.uint64)[0]) >> 1


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator the training loop draws from: (torch's CPU and CUDA states as tensors,
    python's and numpy's as JSON-able lists)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    py = random.getstate()
    np_state = np.random.get_state()
    rest = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    """Set every generator to what `rng_state` returned."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = rest["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = rest["numpy"]
    np.random.set_state((npv[0], np.array(npv[1], dtype=np.uint32), *npv[2:]))
