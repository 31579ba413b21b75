"""Data: built-in and real datasets, torch transforms, keyed sampling, loaders.

    train, val, test, info = build_datasets(DataConfig(name="digits"))
    keys = EpochSampler(len(train), seed=0, epoch=3, rank=0, world=1)
    loader = make_loader(train, keys, batch_size=64, workers=0, device_type="cpu")
    run = make_loader(train, RunBatches(plan, len(train), 0, step=0, end=plan.total, micro=64), 64, workers=2)

Items are a pure function of their key ``(index, seed)``: see `vitscale.data.common`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from vitscale.common import compat, signals
from vitscale.common.errors import UserError
from vitscale.data.builtin import DIRECTIONS, build_builtin
from vitscale.data.common import (
    KeyedDataset,
    Skipped,
    UnreadableFileError,
    collate,
    skipped_files,
    stratified_split,
)
from vitscale.data.config import DataConfig
from vitscale.data.folders import build_real
from vitscale.data.generated import build_cluttered
from vitscale.data.randaugment import RandAugment
from vitscale.data.sampler import EpochSampler, RunBatches, cut, sample_seed
from vitscale.data.shards import build_shards
from vitscale.data.transforms import ClipTransform

# (cfg, train transform, eval transform) -> (train, val, test), by data.name; real data otherwise.
BUILDERS = {"digits": build_builtin, "moving-digits": build_builtin, "cluttered-digits": build_cluttered,
            "webdataset": build_shards}


@dataclass(frozen=True)
class DataInfo:
    """What the model and the report need to know about the data."""

    name: str  # dataset name (DataConfig.name)
    num_classes: int  # label ids are 0 .. num_classes - 1
    class_names: tuple[str, ...]  # name of each label id
    in_chans: int  # input channels (always 3: gray data is repeated)
    frames: int  # frames per item; 1 = images [C, H, W], else clips [C, T, H, W]
    image_size: int  # height = width in pixels
    mean: tuple[float, ...]  # per-channel normalization mean
    std: tuple[float, ...]  # per-channel normalization std

    @property
    def item_shape(self) -> tuple[int, ...]:
        """An item's x: (C, H, W) for images, (C, T, H, W) for clips."""
        frames = (self.frames,) if self.frames > 1 else ()
        return (self.in_chans, *frames, self.image_size, self.image_size)


def transforms_for(cfg: DataConfig) -> tuple[ClipTransform, ClipTransform]:
    """(train, eval) transforms; built-ins are rendered at full size, so eval takes all of it. At
    data.image_size, decided as build_datasets does (DataConfig.sized)."""
    cfg = cfg.sized()
    mean, std = cfg.norm
    eval_crop = 1.0 if cfg.is_builtin else cfg.eval_crop
    policy = RandAugment.parse(cfg.randaugment) if cfg.randaugment else None
    train = ClipTransform(cfg.image_size, mean, std, scale=(cfg.crop_scale, 1.0), flip=cfg.flip,
                          interpolation=cfg.resize_mode, randaugment=policy, color_jitter=cfg.color_jitter,
                          erase_prob=cfg.erase_prob)
    return train, ClipTransform(cfg.image_size, mean, std, eval_crop=eval_crop, interpolation=cfg.resize_mode)


def build_datasets(cfg: DataConfig) -> tuple[KeyedDataset, KeyedDataset, KeyedDataset, DataInfo]:
    """(train, val, test, info) for a data config; raises UserError on a bad path or empty data and
    warns (`warnings`) about what it leaves out. val is empty when data.val_fraction is 0 (a split
    that holds out nothing at another fraction is refused: `check_validation`).

    The three splits are disjoint. val selects (best/ checkpoints, the study's LR, a greedy soup's
    ingredients); test only reports (final.json's test_*, the study's accuracies). test is empty
    where none is configured (real data without data.test_path or data.test_fraction); its items
    are eval-transformed like val's. A data.image_size or data.frames of 0 is the model's, decided
    before by train.inputs.settle; without a model, BUILTIN_SIZE and single frames (DataConfig.sized)."""
    cfg = cfg.sized()
    train_tf, eval_tf = transforms_for(cfg)
    train, val, test = BUILDERS.get(cfg.name, build_real)(cfg, train_tf, eval_tf)
    check_validation(cfg, train, val)
    mean, std = cfg.norm
    info = DataInfo(name=cfg.name, num_classes=len(train.classes), class_names=tuple(train.classes),
                    in_chans=3, frames=cfg.frames, image_size=cfg.image_size, mean=mean, std=std)
    train.item_shape = val.item_shape = test.item_shape = info.item_shape
    return train, val, test, info


def check_validation(cfg: DataConfig, train: KeyedDataset, val: KeyedDataset) -> None:
    """Refuse a split that holds out nothing though data.val_fraction asks for a share (classes of
    one or two items: each gives round(val_fraction x its items)): the run would train without
    validation unasked, its best/ the latest and final.json's best null."""
    if len(val) or cfg.val_path or not cfg.val_fraction:
        return
    classes = f" in {len(train.classes):,} classes" if train.classes else ""
    raise UserError(f"data.val_fraction={cfg.val_fraction:g} holds out no item of the {len(train):,}"
                    f"{classes} (each class gives round(val_fraction x its items)): add images, give "
                    "data.val_path, or set data.val_fraction=0 to train without validation")


def make_loader(dataset: KeyedDataset, sampler, batch_size: int, workers: int = 0,
                device_type: str = "cpu", prefetch: int = 2, drop_last: bool = False,
                sizes: list[int] | None = None) -> DataLoader:
    """A DataLoader over keys from `sampler` (an `EpochSampler` or any iterable of keys), in
    batches of `batch_size`, or of `sizes` in turn (a training plan's steps; keys past them unread);
    or, given a `RunBatches`, over its batches (a whole run's: one iterator, whose workers live
    across epochs; `close` it when done).

    Batches are `collate` dicts (B = 0 when every file of one was unreadable). The loader
    gets its own generator, so creating an iterator does not draw from the global torch RNG
    (which would break exact resume).
    """
    if isinstance(sampler, RunBatches):
        batches = {"batch_sampler": sampler}
    elif sizes is not None:
        batches = {"batch_sampler": list(cut(list(sampler), sizes))}
    else:
        batches = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    return DataLoader(
        dataset, **batches, num_workers=workers,
        collate_fn=functools.partial(collate, shape=dataset.item_shape),
        pin_memory=device_type == "cuda",
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,  # a training run's workers last all the same: it takes one iterator
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=signals.ignore,  # a signal is the trainer's to act on (it stops at a step's end)
    )


def close(batches) -> None:
    """End a loader's iterator now: its worker processes (and pin-memory thread) stop, rather than
    when the iterator is collected (which a traceback holding it delays)."""
    compat.shutdown_workers(batches)


def denormalize(x: Tensor, info: DataInfo) -> Tensor:
    """Undo normalization for pictures -> [0, 1], same shape.

    x: [..., C, H, W] (an image or one frame) or [..., C, T, H, W] (a clip: recognised by
    C = info.in_chans and T = info.frames in those places).
    """
    is_clip = info.frames > 1 and x.ndim >= 4 and tuple(x.shape[-4:-2]) == (info.in_chans, info.frames)
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device)
    shape = (-1,) + (1,) * (3 if is_clip else 2)  # channels, then (T,) H, W
    return (x * std.view(shape) + mean.view(shape)).clamp(0, 1)


__all__ = ["DIRECTIONS", "ClipTransform", "DataConfig", "DataInfo", "EpochSampler", "KeyedDataset",
           "RunBatches", "Skipped", "UnreadableFileError", "build_datasets", "close", "collate",
           "denormalize", "make_loader", "sample_seed", "skipped_files", "stratified_split", "transforms_for"]
