"""Epoch sampler: the keys ``(index, sample_seed)`` one rank reads in one epoch.

Everything is a pure function of its arguments, so a run that stops mid-epoch and resumes
with ``start = keys already consumed by this rank`` reads exactly the remaining keys, with
the same per-sample seeds, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vitscale.data.common import Key
from vitscale.errors import UserError

_MASK64 = np.uint64(2**64 - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a fast, well-mixed uint64 -> uint64 hash."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Per-sample seeds (int64 in [0, 2**63)) from (seed, epoch, index); vectorised."""
    base = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch & (2**64 - 1)))
    mixed = _splitmix64(base ^ np.asarray(indices, dtype=np.uint64))
    return (mixed >> np.uint64(1)).astype(np.int64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed that `EpochSampler` pairs with `index` in `epoch`."""
    return int(sample_seeds(seed, epoch, np.array([index]))[0])


class EpochSampler:
    """Keys ``(index, sample_seed)`` for one rank and one epoch.

    - Order: a permutation of ``range(n)`` drawn from (seed, epoch) only (identity when
      ``shuffle=False``).
    - Ranks: the order is padded by wrapping around (as DistributedSampler) to a multiple
      of ``world`` (or cut to one with ``drop_last``); rank r takes positions r, r+world, ...
      so every rank gets the same count and together they cover every index.
    - ``start``: skip the first `start` keys of this rank (mid-epoch resume).
    - Seeds: ``sample_seed(seed, epoch, index)``; ``seed=None`` gives ``(index, None)``
      eval keys (deterministic center crop / clip) and requires ``shuffle=False``.
    """

    def __init__(self, n: int, seed: int | None, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                 world: int = 1, start: int = 0, drop_last: bool = False):
        if seed is None and shuffle:
            raise UserError("EpochSampler needs an int seed to shuffle; eval keys use shuffle=False")
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} is outside a world of {world}")
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.per_rank = n // world if drop_last else -(-n // world)  # ceil without padding loss
        if not 0 <= start <= self.per_rank:
            raise UserError(f"start {start} is outside this rank's {self.per_rank} keys")
        self.start = start

    def indices(self) -> np.ndarray:
        """This rank's indices for the whole epoch (before `start`)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed & (2**63 - 1), self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.per_rank * self.world
        if total > self.n and self.n > 0:
            order = np.resize(order, total)  # wrap around: [o0..o_{n-1}, o0, o1, ...]
        return order[:total][self.rank :: self.world]

    def keys(self) -> list[Key]:
        """The keys this sampler yields, as a list."""
        idx = self.indices()[self.start :]
        if self.seed is None:
            return [(int(i), None) for i in idx]
        seeds = sample_seeds(self.seed, self.epoch, idx)
        return list(zip(idx.tolist(), seeds.tolist(), strict=True))

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self.per_rank - self.start
