"""What every dataset shares: keyed items, skipped files, collation, seeded splits.

Determinism contract. A dataset is indexed by a key ``(index, seed)``:

- ``seed`` an int (training): every random choice for that item (crop, flip, clip start)
  draws from ``torch.Generator().manual_seed(seed)``, never from the global RNG, so an item
  is a pure function of its key, in any process, in any order.
- ``seed`` None (eval): center crop, center clip; no randomness at all.

A dataset's ``load(index, gen)`` also takes a `vitscale.data.views.View` for ``gen``: one of
a grid of fixed test views (clip starts x crops), again with no randomness.

``dataset[i]`` is ``dataset[(i, None)]``. An item is ``{"x": float32 [C, H, W] (frames=1)
or [C, T, H, W], "y": int, "index": i}``, or a falsy `Skipped(path, reason)` when the file
cannot be read (with ``strict`` the dataset raises instead). `collate` drops skipped items
and lists their paths so the engine can count and name them.

A dataset whose items are rows of one tensor may load a whole batch at once (`load_batch`): the
same batch, bit for bit, without a Python call and a stacked tensor per item (the study's
smallest models on in-memory data waited on per-item loading for up to a third of their time).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitscale.common.errors import UserError

Key = tuple[int, int | None]  # (index, sample seed or None for eval)


@dataclass(frozen=True)
class Skipped:
    """Stands in for an item whose file could not be read; falsy, like None."""

    path: str  # the unreadable file
    reason: str  # the decoder's one-line complaint

    def __bool__(self) -> bool:
        return False


class UnreadableFileError(UserError):
    """A file could not be decoded and `strict` asks to stop rather than skip it."""


def parse_key(key: Any, n: int) -> Key:
    """Accept ``i`` or ``(i, seed)``; check the index range."""
    index, seed = key if isinstance(key, tuple | list) else (key, None)
    index = operator.index(index)
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} items")
    return index, None if seed is None else operator.index(seed)


class KeyedDataset(Dataset):
    """Base class: subclasses set `classes`, define `__len__` and `load(index, gen)`."""

    classes: tuple[str, ...] = ()
    strict: bool = False
    item_shape: tuple[int, ...] = ()  # an item's x shape, for a batch of none (build_datasets sets it)
    view_axes: tuple[str, ...] = ()  # what test views vary here: "clips" (start in a longer video), "crops"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, gen: torch.Generator | None) -> dict | Skipped:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> dict | Skipped:
        index, seed = parse_key(key, len(self))
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return self.load(index, gen)

    def load_batch(self, keys: list[Key]) -> dict | None:
        """A whole batch as `collate` makes it, or None where this dataset loads item by item (the
        default; a dataset of rows in memory overrides it where its items draw nothing at random)."""
        return None

    def __getitems__(self, keys: list) -> list | dict:
        """The DataLoader's batch fetch: `load_batch`'s batch where there is one (`collate` passes a
        batch through), the items one by one otherwise."""
        batch = self.load_batch([parse_key(k, len(self)) for k in keys]) if keys else None
        return batch if batch is not None else [self[k] for k in keys]

    def skip(self, path: str, error: BaseException) -> Skipped:
        """Record an unreadable file, or raise with its name when strict."""
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if self.strict:
            raise UnreadableFileError(
                f"cannot read {path}: {reason}; fix or remove the file, or set data.strict=false to skip it"
            ) from error
        return Skipped(path, reason)


def collate(items: list[dict | Skipped | None] | dict, shape: tuple[int, ...] = ()) -> dict:
    """Stack items into a batch; drop skipped ones and list their paths. A batch already made
    (`KeyedDataset.load_batch`) passes through.

    Returns ``{"x": [B, ...] float32, "y": [B] long, "index": [B] long, "skipped": [paths]}``.
    If every item was skipped, B = 0 and ``x`` is [0, *shape] (`shape` is an item's, the
    dataset's `item_shape`): a model still runs on it, so every rank stays in step, and the
    batch adds nothing (its mean loss is NaN: the engine counts it as no batch).
    """
    if isinstance(items, dict):
        return items
    good = [it for it in items if it]
    skipped = [it.path for it in items if isinstance(it, Skipped)]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return {"x": torch.empty(0, *shape), "y": empty, "index": empty.clone(), "skipped": skipped}
    return {
        "x": torch.stack([it["x"] for it in good]),
        "y": torch.tensor([it["y"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": skipped,
    }


def skipped_files(paths: list[str], most: int = 5) -> str:
    """'3 unreadable files skipped: a, b, c' (the first `most` named)."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return f"{len(paths)} unreadable file{'s' * (len(paths) != 1)} skipped: {', '.join(paths[:most])}{more}"


def stratified_split(labels: list[int] | np.ndarray, fraction: float, seed: int,
                     stream: int = 0x5EED) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists with `fraction` of each class held out (sorted); `stream`
    names the draw (the test split draws apart from the val split)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed & (2**63 - 1), stream])
    train, val = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        k = int(round(fraction * len(members)))
        val += members[:k].tolist()
        train += members[k:].tolist()
    return sorted(train), sorted(val)


def held_out(labels: list[int] | np.ndarray, val_fraction: float, test_fraction: float,
             seed: int) -> tuple[list[int], list[int], list[int]]:
    """Seeded stratified (train, val, test) index lists (sorted, disjoint). val is exactly what
    `stratified_split(labels, val_fraction, seed)` holds out, so adding a test split leaves it
    as it was; test is `test_fraction` of all items, carved from the rest with its own draw."""
    rest, val = stratified_split(labels, val_fraction, seed)
    if test_fraction <= 0:
        return rest, val, []
    share = test_fraction / (1 - val_fraction)  # of what val left
    keep, test = stratified_split(np.asarray(labels)[rest], share, seed, stream=TEST_STREAM)
    return [rest[i] for i in keep], val, [rest[i] for i in test]


TEST_STREAM = 0x7E57  # the test split's draw in `stratified_split`


def as_float(x: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]; float stays as is."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()
