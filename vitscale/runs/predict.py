"""Classify files with a trained run: `vitscale predict RUN FILE_OR_DIR...`, and `load_run`
(`vitscale.load_run`), the run's model, config and class names for a notebook.

    run = vitscale.load_run("runs/pets")            # eval mode, best weights
    x = run.preprocess("cat.jpg")[None]             # [1, 3, H, W] as the run's eval data
    probs = run.model(x).softmax(-1)                # [1, K]; run.classes[k] names class k
    for p in predict(run, ["photos/"], top_k=3):    # batched over a folder's images and videos
        print(p.file, p.top)

A file goes through the run's own evaluation transform (its input size, centre crop, resize
mode, normalisation, and for video its frames and stride: the centre clip), as `vitscale eval`
sees its validation data, read by the same readers as training data. The weights are those
`vitscale eval` reports first: the best checkpoint's (else the newest whole one's), raw unless
`ema` asks for the moving average it keeps beside them (train.ema).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from vitscale.common.device import pick_device
from vitscale.common.errors import UserError
from vitscale.data import transforms_for
from vitscale.data.common import KeyedDataset, Skipped
from vitscale.data.folders import IMAGE_EXTS, VIDEO_EXTS, ImageFiles, VideoFiles, _files
from vitscale.data.transforms import ClipTransform
from vitscale.runs.export import class_names, predictor
from vitscale.train.config import RunConfig

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LoadedRun:
    """A trained run, ready to apply (`load_run`)."""

    path: Path  # the run directory
    model: nn.Module  # eval mode: x [B, C, H, W] (or [B, C, T, H, W] video) -> logits [B, K]
    # (an MAE's: its pooled encoder features [B, D]); the task's `predict`, as eval scores it
    config: RunConfig  # the run's config.yaml
    classes: tuple[str, ...]  # the name of each logit, in class-id order ("0".. for an old run)
    named: bool  # whether `classes` are the run's own (classes.json), not ids made up for an old run
    logits: bool  # whether the model classifies (False: an MAE's features, no classes)
    transform: ClipTransform  # the run's evaluation transform of one decoded file
    checkpoint: Path  # the checkpoint its weights come from
    device: torch.device  # where the model is

    def preprocess(self, path: str | Path) -> Tensor:
        """One image or video file as the model's input: [C, H, W] or [C, T, H, W]; UserError if
        it cannot be read, or is an image and the model takes clips."""
        video = _is_video(str(path))
        if not video and self.config.model.is_video:
            raise UserError(f"{path} is an image; this run's model takes clips of {self.config.model.frames} "
                             "frames: give it a video")
        item = _reader(self, [str(path)], video)[0]
        if not item:
            raise UserError(f"cannot read {path}: {item.reason}")
        return item["x"]


@dataclass(frozen=True)
class Prediction:
    """A file's most probable classes."""

    file: str
    top: tuple[tuple[str, float], ...]  # (class name, probability), most probable first
    ids: tuple[int, ...]  # their class ids

    def as_dict(self) -> dict:
        return {"file": self.file, "top": [{"class": name, "id": i, "probability": p}
                                           for (name, p), i in zip(self.top, self.ids, strict=True)]}

    def line(self) -> str:
        return f"{self.file}: " + ", ".join(f"{name} {p:.3f}" for name, p in self.top)


def load_run(path: str | Path, ema: bool = False, device: str = "cpu") -> LoadedRun:
    """A run directory's model (eval mode, on `device`), config and class names; `ema` takes the
    checkpoint's moving average (a run with train.ema) instead of its raw weights. The model is
    the one `vitscale export` traces (export.predictor)."""
    model, opened, count = predictor(str(path), ema)
    names, named = class_names(opened, count)
    cfg = opened.config
    data = cfg.data  # at the model's input shape (a data size left to the model's is 0 in some configs)
    data = replace(data, image_size=data.image_size or cfg.model.hw[0],
                   frames=data.frames or cfg.model.frames)
    target = pick_device(device)
    return LoadedRun(Path(path), model.to(target), cfg, names, named, count > 0, transforms_for(data)[1],
                     opened.checkpoint.path, target)


def _is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def _reader(run: LoadedRun, files: list[str], video: bool) -> KeyedDataset:
    """The eval-time dataset of `files` (images, or videos), read as the run's data is."""
    samples = [(f, 0) for f in files]
    if not video:
        return ImageFiles(samples, run.classes, run.transform, train=False)
    d = run.config.data
    frames = run.config.model.frames
    return VideoFiles(samples, run.classes, run.transform, train=False, frames=frames, stride=d.frame_stride,
                      threads=d.decode_threads)


def files_of(paths: Iterable[str | Path]) -> list[str]:
    """The files to classify: each file as given, each folder's images and videos (recursively,
    sorted, hidden ones left out); a path that does not exist, or a folder with none, is refused."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = _files(p, IMAGE_EXTS + VIDEO_EXTS)
            if not inside:
                kinds = ", ".join(IMAGE_EXTS[:8] + VIDEO_EXTS[:3])
                raise UserError(f"{p} holds no image or video files ({kinds}, ...); pass files, or folders "
                                 "of them")
            found += inside
        elif p.is_file():
            found.append(str(p))
        else:
            raise UserError(f"{p} does not exist; pass image or video files, or folders of them")
    return found


def predict(run: LoadedRun, paths: Iterable[str | Path], top_k: int = 5,
            batch: int = 32) -> Iterator[Prediction]:
    """The `top_k` most probable classes of each image and video file in `paths` (folders scanned),
    in order, `batch` files at a time; a file that cannot be read (or an image given to a video
    model) is named in a warning and skipped. What is wrong with the run or the
    paths is refused (UserError) here, before any file is read."""
    if not run.logits:
        raise UserError(f"{run.path} holds a {run.config.task} run: its model has no classifier (it gives "
                         "features); fine-tune it (vitscale finetune --init RUN) to classify")
    if top_k < 1 or batch < 1:
        raise UserError(f"--top-k and --batch must be 1 or more, got {top_k} and {batch}")
    return _predictions(run, files_of(paths), top_k, batch)


def _predictions(run: LoadedRun, files: list[str], top_k: int, batch: int) -> Iterator[Prediction]:
    for start in range(0, len(files), batch):
        items = _read(run, files[start:start + batch])
        if not items:
            continue
        x = torch.stack([it["x"] for _, it in items]).to(run.device)  # [B, C, (T,) H, W]
        with torch.no_grad():
            probs = run.model(x).float().softmax(-1).cpu()  # [B, K]
        top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        for (path, _), p, k in zip(items, top.values.tolist(), top.indices.tolist(), strict=True):
            yield Prediction(path, tuple((run.classes[i], v) for i, v in zip(k, p, strict=True)), tuple(k))


def _read(run: LoadedRun, files: list[str]) -> list[tuple[str, dict]]:
    """(file, item) of each readable file, in order; the others named in a warning."""
    video = [_is_video(f) for f in files]
    readers = {kind: _reader(run, [f for f, v in zip(files, video, strict=True) if v == kind], kind)
               for kind in set(video)}
    position = {kind: 0 for kind in readers}
    items = []
    for f, v in zip(files, video, strict=True):
        index, position[v] = position[v], position[v] + 1
        if not v and run.config.model.is_video:
            logger.warning(f"skipped {f}: an image, and this run's model takes clips of "
                           f"{run.config.model.frames} frames")
            continue
        item = readers[v].load(index, None)
        if isinstance(item, Skipped):
            logger.warning(f"skipped {f}: cannot read it ({item.reason})")
        else:
            items.append((f, item))
    return items
