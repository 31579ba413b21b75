"""Epoch sampler: the keys ``(index, sample_seed)`` one rank reads in one epoch.

Everything is a pure function of its arguments, so a run that stops mid-epoch and resumes
with ``start = keys already consumed by this rank`` reads exactly the remaining keys, with
the same per-sample seeds, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vitscale.common.errors import UserError
from vitscale.data.common import Key

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
    - ``repeats`` > 1: repeated augmentation (DeiT's RASampler, Hoffer et al. 2020). The order
      lists each index `repeats` times in a row (its copies thus land on consecutive ranks) and
      is then dealt out as above, each rank keeping only its first ``per_rank`` keys, so an
      epoch has as many steps as without repeats and sees about n / repeats distinct images.
      Copy k of index i takes the seed of ``i * repeats + k``: each copy is augmented differently
      (repeats=1 gives the plain seeds).
    """

    def __init__(self, n: int, seed: int | None, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                 world: int = 1, start: int = 0, drop_last: bool = False, repeats: int = 1):
        if seed is None and shuffle:
            raise UserError("EpochSampler needs an int seed to shuffle; eval keys use shuffle=False")
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} is outside a world of {world}")
        if repeats < 1 or (repeats > 1 and seed is None):
            raise UserError(f"repeats must be 1 or more, and 1 for eval keys; got {repeats}")
        self.n, self.seed, self.epoch, self.shuffle, self.repeats = n, seed, epoch, shuffle, repeats
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.per_rank = n // world if drop_last else -(-n // world)  # ceil without padding loss
        if not 0 <= start <= self.per_rank:
            raise UserError(f"start {start} is outside this rank's {self.per_rank} keys")
        self.start = start

    def _copies(self) -> np.ndarray:
        """This rank's whole epoch as copy ids ``index * repeats + k`` (before `start`)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed & (2**63 - 1), self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        r = self.repeats
        order = (order[:, None] * r + np.arange(r)).reshape(-1)  # [i0*r, i0*r+1, .., i1*r, ..]
        total = (-(-self.n * r // self.world) if r > 1 else self.per_rank) * self.world
        if total > len(order) and self.n > 0:
            order = np.resize(order, total)  # wrap around: [o0..o_{n-1}, o0, o1, ...]
        return order[:total][self.rank :: self.world][: self.per_rank]

    def indices(self) -> np.ndarray:
        """This rank's indices for the whole epoch (before `start`)."""
        return self._copies() // self.repeats

    def keys(self) -> list[Key]:
        """The keys this sampler yields, as a list."""
        copies = self._copies()[self.start :]
        idx = copies // self.repeats
        if self.seed is None:
            return [(int(i), None) for i in idx]
        seeds = sample_seeds(self.seed, self.epoch, copies)
        return list(zip(idx.tolist(), seeds.tolist(), strict=True))

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self.per_rank - self.start


def cut(keys: list[Key], sizes: list[int]) -> Iterator[list[Key]]:
    """Consecutive batches of `sizes` keys from the front of `keys` (keys past them unread)."""
    end = 0
    for n in sizes:
        if end + n > len(keys):
            raise ValueError(f"batches of {sum(sizes)} keys from a sampler of {len(keys)}")
        yield keys[end : end + n]
        end += n


class RunBatches:
    """A batch sampler for one DataLoader that lasts a run: the micro-batches of keys one rank reads
    from optimizer step `step` to step `end` of a training plan (`vitscale.train.steps.Plan`), epoch after
    epoch, so its workers live across epochs and fetch an epoch's first batches while the last one
    ends and is evaluated.

    Each epoch's keys are those of that epoch's `EpochSampler` (for the first, from the step's
    offset in it: a resume) and its micro-batch sizes the plan's (``plan.batches``: `accum` a step,
    multigrid steps larger), so the batches are those of a new loader made each epoch, key for key.
    Lazy: one epoch's keys are held at a time."""

    def __init__(self, plan, n: int, seed: int, step: int, end: int, micro: int, accum: int = 1,
                 rank: int = 0, world: int = 1, repeats: int = 1):
        self.plan, self.n, self.seed, self.step, self.end = plan, n, seed, step, end
        self.micro, self.accum, self.rank, self.world, self.repeats = micro, accum, rank, world, repeats

    def epochs(self) -> Iterator[tuple[EpochSampler, list[int]]]:
        """(the epoch's sampler, its micro-batch sizes) for each epoch the steps reach into."""
        step = self.step
        while step < self.end:
            stop = min(self.end, self.plan.epoch_end(step))
            yield (EpochSampler(self.n, self.seed, self.plan.epoch(step), rank=self.rank, world=self.world,
                                start=self.plan.offset(step), repeats=self.repeats),
                   self.plan.batches(step, stop, self.micro, self.accum))
            step = stop

    def __iter__(self) -> Iterator[list[Key]]:
        for sampler, sizes in self.epochs():
            yield from cut(sampler.keys(), sizes)

    def __len__(self) -> int:
        return max(0, self.end - self.step) * self.accum
