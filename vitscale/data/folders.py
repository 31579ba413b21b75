"""Real data: image folders, video folders and VideoMAE-style video lists.

Folders hold one subfolder per class (class ids = sorted subfolder names; files are found
recursively inside each class folder). A video list is a text/CSV file with one
``path,label`` or ``path label`` line per video (label an int; relative paths are relative
to the list's folder; blank and ``#`` lines and a non-numeric header line are ignored).
An unreadable file gives a `Skipped` item (or raises with ``strict``); a bad path, an empty
folder or a list with no usable line raises one ValueError saying what to do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitscale.data.common import KeyedDataset, Skipped, stratified_split
from vitscale.data.transforms import ClipTransform
from vitscale.data.video import read_clip
from vitscale.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
Sample = tuple[str, int]  # (file path, label id)


def _files(folder: Path, exts: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."))


def scan_folder(root: str, exts: tuple[str, ...], classes: tuple[str, ...] | None = None,
                what: str = "image") -> tuple[list[Sample], tuple[str, ...]]:
    """(samples, class names) of a class-per-subfolder tree; `classes` fixes the id map (val)."""
    p = Path(root).expanduser()
    if not p.is_dir():
        raise UserError(f"data folder {root!r} does not exist or is not a folder; "
                         f"set data.path to a folder with one subfolder of {what}s per class")
    found = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"data folder {root!r} has no class subfolders; put {what}s in {root}/CLASS_NAME/")
    if classes is None:
        classes = tuple(found)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise UserError(f"val folder {root!r} has classes the training data lacks: {', '.join(extra[:5])}")
    ids = {c: i for i, c in enumerate(classes)}
    samples = [(f, ids[c]) for c in found for f in _files(p / c, exts)]
    if not samples:
        raise UserError(f"no {what} files ({', '.join(exts)}) under {root!r}; "
                         f"put them in {root}/CLASS_NAME/")
    return samples, classes


def read_list(path: str) -> list[Sample]:
    """Parse a ``path,label`` / ``path label`` video list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"video list {path!r} does not exist; set data.path to a CSV of `path,label` lines")
    samples = []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        label = parts[-1].strip() if len(parts) == 2 else ""
        if not label.lstrip("-").isdigit():
            if not samples and n == 1:
                continue  # a header line
            raise UserError(f"{path}:{n}: expected `path,label` with an integer label, got {raw!r}")
        if int(label) < 0:
            raise UserError(f"{path}:{n}: labels must be 0 or more, got {label}")
        f = Path(parts[0].strip()).expanduser()
        samples.append((str(f if f.is_absolute() else p.parent / f), int(label)))
    if not samples:
        raise UserError(f"video list {path!r} has no `path,label` lines")
    return samples


def read_image(path: str, short: int | None) -> torch.Tensor:
    """Any PIL-readable image as uint8 [3, H, W] RGB; shrunk cheaply when far larger than `short`."""
    with Image.open(path) as img:
        if short:
            img.draft("RGB", (short, short))  # JPEG: decode at a reduced scale, never below `short`
        if img.mode == "P" and "transparency" in img.info:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = img.convert("RGBA")
        if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit gray: scale, don't clip
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
        img = img.convert("RGB")
        factor = min(img.size) // short if short else 1
        if factor >= 2:
            img = img.reduce(factor)  # box-filter shrink; keeps the shorter side >= short
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


class ImageFiles(KeyedDataset):
    """Images from a list of (path, label)."""

    def __init__(self, samples: list[Sample], classes: tuple[str, ...], transform: ClipTransform,
                 train: bool, strict: bool = False):
        self.samples, self.classes, self.transform, self.strict = samples, classes, transform, strict
        self.short = transform.source_side(train)
        self.labels = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, gen: torch.Generator | None) -> dict | Skipped:
        path, label = self.samples[index]
        try:
            x = read_image(path, self.short)
        except Exception as e:  # any decoder failure means "this file is unusable"
            return self.skip(path, e)
        return {"x": self.transform(x, gen), "y": label, "index": index}


class VideoFiles(KeyedDataset):
    """Clips from a list of (video path, label); frames=1 gives [C, H, W] single frames."""

    def __init__(self, samples: list[Sample], classes: tuple[str, ...], transform: ClipTransform,
                 train: bool, frames: int, stride: int, strict: bool = False):
        self.samples, self.classes, self.transform, self.strict = samples, classes, transform, strict
        self.frames, self.stride = frames, stride
        self.short = transform.source_side(train)
        self.labels = [label for _, label in samples]
        self.counts: dict[str, int] = {}  # frame count cache (per process)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, gen: torch.Generator | None) -> dict | Skipped:
        path, label = self.samples[index]
        try:
            x = read_clip(path, self.frames, self.stride, gen, self.short, self.counts)
        except Exception as e:  # any decoder failure means "this file is unusable"
            return self.skip(path, e)
        if self.frames == 1:
            x = x[:, 0]  # [3, 1, H, W] -> [3, H, W]
        return {"x": self.transform(x, gen), "y": label, "index": index}


def _split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    train, val = stratified_split([label for _, label in samples], fraction, seed)
    return [samples[i] for i in train], [samples[i] for i in val]


def build_real(cfg, train_tf: ClipTransform, eval_tf: ClipTransform) -> tuple[KeyedDataset, KeyedDataset]:
    """(train, val) for image-folder, video-folder and video-csv."""
    if cfg.name == "video-csv":
        train_s = read_list(cfg.path)
        val_s = read_list(cfg.val_path) if cfg.val_path else None
        top = max(label for _, label in train_s + (val_s or []))
        classes = tuple(str(i) for i in range(top + 1))
    else:
        exts, what = (IMAGE_EXTS, "image") if cfg.name == "image-folder" else (VIDEO_EXTS, "video")
        train_s, classes = scan_folder(cfg.path, exts, what=what)
        val_s = scan_folder(cfg.val_path, exts, classes, what)[0] if cfg.val_path else None
    if val_s is None:
        train_s, val_s = _split(train_s, cfg.val_fraction, cfg.seed)
    if cfg.name == "image-folder":
        return (ImageFiles(train_s, classes, train_tf, True, cfg.strict),
                ImageFiles(val_s, classes, eval_tf, False, cfg.strict))
    clip = dict(frames=cfg.frames, stride=cfg.frame_stride, strict=cfg.strict)
    return (VideoFiles(train_s, classes, train_tf, True, **clip),
            VideoFiles(val_s, classes, eval_tf, False, **clip))
