"""Real data: image folders, video folders and VideoMAE-style video lists.

Folders hold one subfolder per class (class ids = sorted subfolder names; files are found
recursively inside each class folder). An image is any file PIL decodes (IMAGE_EXTS: .jpg, .png,
.webp, .tif, .gif's first frame, ...; any case), in any mode (P, L, LA, RGBA, I;16, CMYK: read
as RGB). A class folder with no files of the kind is dropped with a warning; the files of
another kind, and folders that hold a run or a study, are named in a warning and left out.

A video list is a UTF-8 text/CSV file with one line per video (relative paths are relative to
the list's folder; blank and ``#`` lines are ignored, and so is a first line of words such as
``path,label``), in one of VideoMAE V2's forms, fields separated by commas or spaces:

    path label                 a labelled video (Kinetics)
    path start count           frames start .. start+count-1 only (count -1 = to the end), no
                               label: a pre-training list (``path 0 -1`` = the whole video)
    path start count label     a labelled frame range

Clips are sampled inside a line's frame range (training, evaluation and test views alike). A
list's lines are all labelled or all not; an unlabelled list has no classes (pre-training only).
Labels are class ids: 0 .. K-1 where K is data.num_classes if set, else the
number of distinct labels in the training list (so a label can never size the head).
Listed files that do not exist are warned about (and refused if none exists). An unreadable
file gives a `Skipped` item (or raises with ``strict``); a bad path, an empty folder, a list
that is not text or a line without a class id raises one UserError naming the file (and
line) and saying what to do.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from vitscale.common import rundir
from vitscale.common.errors import UserError
from vitscale.data.common import TEST_STREAM, KeyedDataset, Skipped, stratified_split
from vitscale.data.transforms import ClipTransform
from vitscale.data.video import pyav, read_clip

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


def _pil_extensions() -> tuple[str, ...]:
    """Every file extension PIL opens and decodes itself (in any case: a suffix is compared
    lowered), the common ones first: .tif, .gif (its first frame), .ico, .ppm ... as well as
    .jpg and .png. Left out: stubs that need a handler from elsewhere (HDF5, GRIB, WMF) and the
    video extensions (PIL's MPEG plugin only reads a header)."""
    Image.init()

    def decodes(fmt: str) -> bool:
        factory = Image.OPEN[fmt][0]
        return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    known = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and decodes(fmt)}
    common = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
    return common + tuple(sorted(known - set(common) - set(VIDEO_EXTS)))


IMAGE_EXTS = _pil_extensions()
Sample = tuple[str, int]  # (file path, label id)
Row = tuple[str, int, int, int]  # a list line: (path, label id or NO_LABEL, first frame, frames or -1)
NO_LABEL = -1


def _files(folder: Path, exts: tuple[str, ...], passed: list[str] | None = None,
           other: list[str] | None = None) -> list[str]:
    """The files of the kind (`exts`, any case) under `folder`, recursively, sorted. A folder
    holding a run or a study (vitscale.common.rundir) is passed over and added to `passed`; files of
    another kind are added to `other` (hidden files are neither)."""
    passed, other = [] if passed is None else passed, [] if other is None else other
    found = []
    for top, dirs, names in os.walk(folder):
        if rundir.holds_work(Path(top)):
            passed.append(top)
            dirs.clear()
            continue
        for name in names:
            f = Path(top) / name
            if name.startswith("."):
                continue
            if f.suffix.lower() in exts and f.is_file():
                found.append(str(f))
            else:
                other.append(str(f))
    return sorted(found)


def _warn_left_out(root: str, what: str, passed: list[str], other: list[str]) -> None:
    """Name, with their count, what a scan of `root` left out: folders holding a run or a study,
    and files that are no `what` (by their extension)."""
    if passed:
        warnings.warn(f"{root}: passed over {len(passed)} folder(s) that hold a run or a study "
                      f"({', '.join(sorted(passed)[:5])}); they are not data", stacklevel=3)
    if other:
        warnings.warn(f"{root}: skipped {len(other)} file(s) that are no {what} files by their extension "
                      f"({', '.join(sorted(other)[:5])}{', ...' if len(other) > 5 else ''})", stacklevel=3)


def _loose(folder: Path, exts: tuple[str, ...]) -> list[str]:
    """The files of the kind directly in `folder` (not in its subfolders), sorted."""
    return sorted(str(f) for f in folder.iterdir()
                  if f.suffix.lower() in exts and f.is_file() and not f.name.startswith("."))


def scan_folder(root: str, exts: tuple[str, ...], classes: tuple[str, ...] | None = None,
                what: str = "image") -> tuple[list[Sample], tuple[str, ...]]:
    """(samples, class names) of a class-per-subfolder tree; `classes` fixes the id map (val).

    A subfolder with no such files is no class: it is dropped with a warning. A flat folder (its
    files directly in it, no class subfolder holding any) is unlabelled data: no classes, every
    label 0 (pre-training reads no label); so is a val folder when training had no classes.
    """
    p = Path(root).expanduser()
    if not p.is_dir():
        raise UserError(f"data folder {root!r} does not exist or is not a folder; "
                         f"set data.path to a folder with one subfolder of {what}s per class")
    passed, other = [], []
    try:
        files = {d.name: _files(d, exts, passed, other) for d in p.iterdir()
                 if d.is_dir() and not d.name.startswith(".") and not rundir.holds_work(d)}
        passed += [str(d) for d in p.iterdir() if d.is_dir() and rundir.holds_work(d)]
        loose = _loose(p, exts)
    except OSError as e:
        raise UserError(f"cannot read data folder {root!r}: {e.strerror} ({e.filename})") from None
    _warn_left_out(root, what, passed, other)
    if loose and not classes and not any(files.values()):
        return [(f, 0) for f in loose], ()
    if loose and classes is None:
        warnings.warn(f"{root}: {len(loose)} {what} file(s) lie directly in it, in no class subfolder "
                      f"(e.g. {Path(loose[0]).name}); they are left out", stacklevel=2)
    if not files:
        raise UserError(f"data folder {root!r} has no class subfolders and no {what} files; put {what}s in "
                         f"{root}/CLASS_NAME/ (or, to pre-train without labels, in {root} itself)")
    empty = sorted(c for c, f in files.items() if not f)
    if classes is None and empty and len(empty) < len(files):
        warnings.warn(f"{root}: dropped {len(empty)} class folder(s) with no {what} files "
                      f"({', '.join(empty[:5])}); they are not classes", stacklevel=2)
    found = sorted(c for c, f in files.items() if f)
    if not found:
        raise UserError(f"no {what} files ({', '.join(exts[:8])}, ...) under {root!r}; "
                         f"put them in {root}/CLASS_NAME/")
    if classes is None:
        classes = tuple(found)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise UserError(f"val folder {root!r} has classes the training data lacks: {', '.join(extra[:5])}")
    ids = {c: i for i, c in enumerate(classes)}
    return [(f, ids[c]) for c in found for f in files[c]], classes


def _text(path: str) -> str:
    """A video list's text; UserError naming the file when it is missing or not text."""
    p = Path(path).expanduser()
    what = "; set data.path (or data.val_path) to a text file of `path,label` lines"
    if p.is_dir():
        raise UserError(f"video list {path!r} is a folder, not a file{what} "
                         "(or use data.name=video-folder for a folder of class subfolders)")
    if not p.is_file():
        raise UserError(f"video list {path!r} does not exist{what}")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark is no path
    except OSError as e:
        raise UserError(f"cannot read video list {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"video list {path!r} is not a text file (byte {e.start}: no UTF-8){what}") from None
    if "\0" in text:
        raise UserError(f"video list {path!r} is not a text file (it holds NUL bytes){what}")
    return text


NUMBER = re.compile(r"-?[0-9]{1,4000}", re.ASCII)  # (int() refuses longer digit strings)
HEADER_WORD = re.compile(r"[A-Za-z_][\w ]*", re.ASCII)
FORMS = ("expected `path label`, `path start count` or `path start count label` (VideoMAE V2's lists: "
         "frames start .. start+count-1, count -1 = to the end; labels are class ids 0, 1, 2, ...)")


def _unquote(field: str) -> str:
    """' "a.mp4" ' -> 'a.mp4' (a spreadsheet's quotes)."""
    field = field.strip()
    return field[1:-1] if len(field) >= 2 and field[0] == field[-1] == '"' else field


def _split_line(line: str) -> tuple[str, list[int]]:
    """'a b.mp4 0 -1' -> ('a b.mp4', [0, -1]): the path, and up to 3 whole numbers after it."""
    sep = "," if "," in line else None
    head, numbers = line, []
    while len(numbers) < 3:
        parts = head.rsplit(sep, 1)
        if len(parts) < 2 or not NUMBER.fullmatch(_unquote(parts[1])):
            break
        head, numbers = parts[0], [int(_unquote(parts[1])), *numbers]
    return _unquote(head), numbers


def _row(path: str, n: int, raw: str, numbers: list[int]) -> tuple[int, int, int]:
    """(label or NO_LABEL, first frame, frame count or -1) of a list line's numbers, else a UserError."""
    label = numbers[-1] if len(numbers) != 2 else NO_LABEL
    start, count = numbers[:2] if len(numbers) >= 2 else (0, -1)
    problem = ("its label must be a class id (0, 1, 2, ...)" if len(numbers) != 2 and label < 0 else
               "its first frame must be 0 or more" if start < 0 else
               "its frame count must be 1 or more, or -1 (to the end)" if count == 0 or count < -1 else "")
    if problem:
        raise UserError(f"{path}:{n}: {problem}, got {raw[:80]!r}")
    return label, start, count


def read_list(path: str) -> tuple[list[Row], list[int]]:
    """Parse a video list (`path label`, `path start count`, `path start count label`) ->
    (rows, the line number of each).

    The first line is a header only when its 2 to 4 fields are all words (``path,label``,
    ``video class_id``); any other line without the numbers of one of the forms is refused.
    """
    rows, lines = [], []
    for n, raw in enumerate(_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, numbers = _split_line(line)
        if not numbers or not name:
            words = [_unquote(x) for x in (line.split(",") if "," in line else line.split())]
            if not rows and 2 <= len(words) <= 4 and all(HEADER_WORD.fullmatch(x) for x in words):
                continue  # a header line
            raise UserError(f"{path}:{n}: {FORMS}, got {raw[:80]!r}")
        f = Path(name).expanduser()
        rows.append((str(f if f.is_absolute() else Path(path).expanduser().parent / f),
                     *_row(path, n, raw, numbers)))
        lines.append(n)
    if not rows:
        raise UserError(f"video list {path!r} has no `path,label` lines (nor `path start count` ones)")
    return rows, lines


def _check_listed(path: str, rows: list[Row], lines: list[int]) -> None:
    """Refuse a list none of whose files exist, or one naming a folder; warn about the missing ones
    (skipped) of the rest."""
    missing = [(n, r[0]) for r, n in zip(rows, lines, strict=True) if not Path(r[0]).is_file()]
    if not missing:
        return
    folder = next(((n, f) for n, f in missing if Path(f).is_dir()), None)
    if folder:
        raise UserError(f"{path}:{folder[0]}: {folder[1]} is a folder (VideoMAE V2's frames as images?); "
                         "vitscale reads video files: list the videos")
    n, f = missing[0]
    if len(missing) == len(rows):
        raise UserError(f"{path}:{n}: {f} does not exist, nor does any other file the list names; relative "
                         f"paths are relative to the list's folder ({Path(path).expanduser().parent})")
    warnings.warn(f"{len(missing)} of the {len(rows)} files listed in {path} do not exist (the first: "
                  f"{path}:{n}: {f}); they will be skipped", stacklevel=2)


def list_classes(lists: dict[str, tuple[list[Row], list[int]]], declared: int) -> tuple[str, ...]:
    """Class names "0" .. "K-1" of video lists {path: (rows, line numbers)}, training list first;
    () when the lists have no labels (`path start count` lines, for pre-training).

    K is `declared` (data.num_classes) if set, else the number of distinct labels in the
    training list, which must then be exactly 0 .. K-1 (and val labels among them): a label
    is a class index, never a free number that sizes the head.
    """
    first = next(iter(lists))
    labelled = lists[first][0][0][1] != NO_LABEL
    for path, (rows, lines) in lists.items():
        odd = next((n for r, n in zip(rows, lines, strict=True) if (r[1] != NO_LABEL) != labelled), None)
        if odd:
            raise UserError(f"{path}:{odd}: {'no' if labelled else 'a'} label, unlike {first}:"
                             f"{lists[first][1][0]}; the lists' lines are all labelled (`path label`, `path "
                             "start count label`) or none are (`path start count`, for pre-training)")
    if not labelled:
        if declared:
            raise UserError(f"{first} has no labels (`path start count` lines): leave data.num_classes 0")
        return ()
    k = declared or len({r[1] for r in lists[first][0]})
    rule = (f"labels must be below data.num_classes={declared}; raise it or fix the label" if declared else
            f"the training list uses {k} distinct labels, so labels must be 0..{k - 1}; renumber them, "
            "or set data.num_classes=N when some class ids have no training videos")
    for path, (rows, lines) in lists.items():
        bad = next(((r[1], n) for r, n in zip(rows, lines, strict=True) if r[1] >= k), None)
        if bad:
            raise UserError(f"{path}:{bad[1]}: label {bad[0]} is no class id: {rule}")
    return tuple(str(i) for i in range(k))


def read_image(path: str | io.BytesIO, short: int | None) -> torch.Tensor:
    """Any PIL-readable image as uint8 [3, H, W] RGB; shrunk cheaply when far larger than `short`.

    A large image is read without PIL's warning (it is shrunk at once); one of more than twice
    PIL's MAX_IMAGE_PIXELS raises (a decompression bomb, so the file is skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
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

    view_axes = ("crops",)

    def __init__(self, samples: list[Sample], classes: tuple[str, ...], transform: ClipTransform,
                 train: bool, strict: bool = False):
        self.samples, self.classes, self.transform, self.strict = samples, classes, transform, strict
        self.short = transform.source_side(train)
        self.labels = [s[1] for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, index: int) -> str | io.BytesIO:
        """What PIL opens for an item: its file (a tar shard's reader gives the member's bytes)."""
        return self.samples[index][0]

    def load(self, index: int, gen: torch.Generator | None) -> dict | Skipped:
        path, label = self.samples[index][:2]
        try:
            x = read_image(self.source(index), self.short)
        except Exception as e:  # any decoder failure means "this file is unusable"
            return self.skip(path, e)
        return {"x": self.transform(x, gen), "y": label, "index": index}


class VideoFiles(KeyedDataset):
    """Clips from a list of (video path, label) or video list rows (path, label, first frame,
    frames or -1: where clips are taken); frames=1 gives [C, H, W] single frames."""

    view_axes = ("clips", "crops")

    def __init__(self, samples: list[Sample] | list[Row], classes: tuple[str, ...], transform: ClipTransform,
                 train: bool, frames: int, stride: int, strict: bool = False, threads: int = 0):
        self.samples = [(s[0], max(s[1], 0)) for s in samples]  # (no label: 0, which nothing reads)
        self.spans = [tuple(s[2:4]) or (0, -1) for s in samples]
        self.classes, self.transform, self.strict = classes, transform, strict
        self.frames, self.stride, self.threads = frames, stride, threads  # threads: read_clip's
        self.short = transform.source_side(train)
        self.labels = [label for _, label in self.samples]
        self.counts: dict[str, int] = {}  # frame count cache (per process)
        pyav()  # without PyAV: one line now, not every clip skipped as unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, gen: torch.Generator | None) -> dict | Skipped:
        path, label = self.samples[index]
        try:
            x = read_clip(path, self.frames, self.stride, gen, self.short, self.counts, self.spans[index],
                          self.threads)
        except Exception as e:  # any decoder failure means "this file is unusable"
            return self.skip(path, e)
        if self.frames == 1:
            x = x[:, 0]  # [3, 1, H, W] -> [3, H, W]
        return {"x": self.transform(x, gen), "y": label, "index": index}


def _split(samples: list, fraction: float, seed: int, stream: int = 0x5EED) -> tuple[list, list]:
    """Seeded stratified split of samples or list rows (label second)."""
    train, val = stratified_split([s[1] for s in samples], fraction, seed, stream)
    return [samples[i] for i in train], [samples[i] for i in val]


def split_rest(cfg, train_s: list, val_s: list | None, test_s: list | None) -> tuple[list, list, list]:
    """(train, val, test) samples (label second): a split given as None (no data.val_path /
    data.test_path) is carved from train, val as data.val_fraction, then test as
    data.test_fraction of all (`held_out`'s split: val stays the same)."""
    if val_s is None:
        train_s, val_s = _split(train_s, cfg.val_fraction, cfg.seed)
    if test_s is None:
        share = cfg.test_share / (1 - (cfg.val_fraction if not cfg.val_path else 0))  # of what is left
        train_s, test_s = _split(train_s, share, cfg.seed, TEST_STREAM) if share > 0 else (train_s, [])
    return train_s, val_s, test_s


def build_real(cfg, train_tf: ClipTransform,
               eval_tf: ClipTransform) -> tuple[KeyedDataset, KeyedDataset, KeyedDataset]:
    """(train, val, test) for image-folder, video-folder and video-csv. val: data.val_path, else
    data.val_fraction of the training data; test: data.test_path, else data.test_fraction of
    what training keeps (`held_out`'s split: val stays the same), else empty."""
    paths = (cfg.path, cfg.val_path, cfg.test_path)
    if cfg.name == "video-csv":
        lists = {p: read_list(p) for p in dict.fromkeys(paths) if p}
        classes = list_classes(lists, cfg.num_classes)
        for p, (rows, lines) in lists.items():
            _check_listed(p, rows, lines)
        train_s, val_s, test_s = (lists[p][0] if p else None for p in paths)
    else:
        exts, what = (IMAGE_EXTS, "image") if cfg.name == "image-folder" else (VIDEO_EXTS, "video")
        train_s, classes = scan_folder(cfg.path, exts, what=what)
        val_s, test_s = (scan_folder(p, exts, classes, what)[0] if p else None for p in paths[1:])
    train_s, val_s, test_s = split_rest(cfg, train_s, val_s, test_s)
    splits = ((train_s, train_tf, True), (val_s, eval_tf, False), (test_s, eval_tf, False))
    if cfg.name == "image-folder":
        train, val, test = (ImageFiles(s, classes, tf, is_train, cfg.strict) for s, tf, is_train in splits)
    else:
        clip = dict(frames=cfg.frames, stride=cfg.frame_stride, strict=cfg.strict, threads=cfg.decode_threads)
        train, val, test = (VideoFiles(s, classes, tf, is_train, **clip) for s, tf, is_train in splits)
    for dataset, where in ((train, cfg.path), (val, cfg.val_path or cfg.path),
                           (test, cfg.test_path or cfg.path)):
        probe(dataset, where)
    return train, val, test


def probe(dataset: KeyedDataset, where: str, tries: int = 8) -> None:
    """Refuse, before any work, data none of whose files (`tries` of them, spread out) can be read."""
    n = len(dataset)
    failed = []
    for i in dict.fromkeys(k * (n - 1) // max(1, tries - 1) for k in range(min(tries, n))):
        item = dataset[i]
        if item:
            return
        failed.append(item)
    if failed:
        raise UserError(f"none of the {len(failed)} files tried in {where} could be read, e.g. "
                         f"{failed[0].path}: {failed[0].reason}; check the files (Git LFS pointers? "
                         "run git lfs pull)")
