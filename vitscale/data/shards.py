"""webdataset tar shards as a keyed, random-access image source (``data.name=webdataset``).

A shard is a plain (uncompressed) tar file; a sample is the run of consecutive members that
share a key, as the webdataset library groups them: the member's path up to the first dot of
its basename (``a/b/x1.seg.png`` -> key ``a/b/x1``, extension ``seg.png``, lowercased).
Members named ``__*__`` are metadata and ignored. A sample takes its image from a ``jpg``,
``jpeg``, ``png``, ``webp`` or ``bmp`` member (decoded with Pillow, as image-folder does) and
its label from the first of a ``cls``, ``label`` or ``class`` member holding an integer
(webdataset's writer stores ``cls`` as ASCII digits), a ``json`` member's ``"label"`` (or
``"cls"``) key, or a ``txt`` member holding an integer.

Unlike webdataset's streaming reader, every shard is indexed once (where each image's bytes
lie, and the label) and an item is read by seeking, so items stay pure functions of their key
``(index, seed)`` (see `vitscale.data.common`): seeded splits, any order, exact resume. The
index of a shard is cached in the process and on disk (``$VITSCALE_CACHE``, default
``~/.cache/vitscale``, under ``tar-index/``), keyed by the shard's path, size and mtime.
Each process (each DataLoader worker) opens its own file handles.

Shard specs: a brace pattern (``train-{000000..000099}.tar``, ``{a,b}``), a folder (its
``*.tar`` files, sorted), or a comma list of those. Labels are class ids 0 .. K-1 (K is
data.num_classes if set, else the number of distinct labels in the training shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path

from vitscale.common.errors import UserError
from vitscale.data.common import KeyedDataset
from vitscale.data.folders import ImageFiles, probe, split_rest
from vitscale.data.transforms import ClipTransform

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")  # preference order when a sample has several
JSON_KEYS = ("json", "jsn")
LABEL_KEYS = ("cls", "label", "class", *JSON_KEYS, "txt")  # preference order; a caption txt comes last
JSON_LABELS = ("label", "cls")
INDEX_VERSION = 1
OPEN_SHARDS = 64  # file handles kept open per process (least recently used closed first)
Member = tuple[str, int, int, int, int]  # (shard:key.ext, label id, shard number, data offset, bytes)

_indexes: dict[tuple[str, int, int], list[list]] = {}  # per process: (path, size, mtime) -> index


def expand_braces(pattern: str) -> list[str]:
    """'s-{00..02}.tar' -> ['s-00.tar', 's-01.tar', 's-02.tar']; '{a,b}x' -> ['ax', 'bx'].

    Ranges keep the width of a zero-padded bound; braces nest; a brace with neither ``..``
    nor ``,`` is kept as it is."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise UserError(f"shard pattern {pattern!r} has an unclosed '{{'")
    head, body, rest = pattern[:start], pattern[start + 1:end], expand_braces(pattern[end + 1:])
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numbers:
        a, b = numbers.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    else:
        parts = _split_top(body)
        if len(parts) < 2:
            return [head + "{" + body + "}" + r for r in rest]
        choices = [c for p in parts for c in expand_braces(p)]
    return [head + c + r for c in choices for r in rest]


def _split_top(text: str) -> list[str]:
    """Split at commas outside braces: 'a,{b,c},d' -> ['a', '{b,c}', 'd']."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return parts + [text[last:]]


def shard_paths(spec: str, field: str) -> list[str]:
    """The shard files of a spec (comma list of brace patterns and folders), in order."""
    if "://" in spec or spec.startswith("pipe:"):
        raise UserError(f"{field}={spec!r}: webdataset shards must be local files (copy or mount them)")
    paths = []
    for part in (p.strip() for p in _split_top(spec)):
        if not part:
            continue
        for name in expand_braces(part):
            p = Path(name).expanduser()
            if p.is_dir():
                found = sorted(str(f) for f in p.glob("*.tar") if f.is_file())
                if not found:
                    raise UserError(f"{field}: folder {name!r} holds no .tar shards")
                paths += found
            elif p.is_file():
                paths.append(str(p))
            else:
                raise UserError(f"{field}: shard {name!r} does not exist; set {field} to shard files "
                                 "(e.g. train-{000000..000099}.tar), a folder of .tar files, or a comma list")
    if not paths:
        raise UserError(f"{field}={spec!r} names no shards")
    return paths


def _label(shard: str, key: str, ext: str, data: bytes) -> int:
    """A label member's class id; UserError naming the shard and key when it is none."""
    try:
        if ext in JSON_KEYS:
            meta = json.loads(data)
            value = next(meta[k] for k in JSON_LABELS if k in meta) if isinstance(meta, dict) else None
        else:
            value = int(data.decode("utf-8").strip())
    except (ValueError, StopIteration, UnicodeDecodeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        shown = data[:40].decode("utf-8", "replace")
        raise UserError(f"{shard}: sample {key!r}: its {ext} member must hold a class id (0, 1, 2, ...)"
                         f"{' under ' + '/'.join(JSON_LABELS) if ext in JSON_KEYS else ''}, got {shown!r}")
    return value


def _sample(shard: str, key: str, members: dict[str, tuple[int, int]], tar: tarfile.TarFile,
            infos: dict[str, tarfile.TarInfo]) -> list:
    """[key, image ext, offset, size, label] of one grouped sample, else a UserError."""
    image = next((e for e in IMAGE_KEYS if e in members), None)
    label_ext = next((e for e in LABEL_KEYS if e in members), None)
    if image is None or label_ext is None:
        missing = (f"image member ({'/'.join(IMAGE_KEYS)})" if image is None else
                   f"label member ({'/'.join(LABEL_KEYS)})")
        raise UserError(f"{shard}: sample {key!r} has no {missing} (it has: "
                         f"{', '.join(sorted(members)) or 'nothing'}); fix the shard")
    f = tar.extractfile(infos[label_ext])
    label = _label(shard, key, label_ext, f.read() if f else b"")
    return [key, image, *members[image], label]


def index_tar(shard: str) -> list[list]:
    """Read a shard's headers (not its images) -> [[key, image ext, offset, size, label], ...].

    A shard cut short keeps the samples before the cut (with a warning): a member whose bytes
    are cut is skipped when read, and a last sample left without its image or label is dropped."""
    samples, key, members, infos, cut = [], None, {}, {}, ""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError as e:  # (the first header's failure raises in open)
                    cut = str(e)
                    break
                if info is None:
                    break
                name = info.name
                base = name.rsplit("/", 1)[-1]
                if not info.isreg() or (base.startswith("__") and base.endswith("__")) or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                this = name[: len(name) - len(base)] + stem
                if this != key:
                    if key is not None:
                        samples.append(_sample(shard, key, members, tar, infos))
                    key, members, infos = this, {}, {}
                ext = ext.lower()
                if ext in members:
                    raise UserError(f"{shard}: sample {key!r} has two {ext} members; fix the shard")
                members[ext], infos[ext] = (info.offset_data, info.size), info
            if key is not None:
                try:
                    samples.append(_sample(shard, key, members, tar, infos))
                except UserError:
                    if not cut:
                        raise
    except tarfile.ReadError as e:
        raise UserError(f"{shard} is not a readable tar shard ({e}); webdataset shards are plain, "
                         "uncompressed .tar files") from None
    except OSError as e:
        raise UserError(f"cannot read shard {shard}: {e.strerror or e}") from None
    if cut:
        warnings.warn(f"{shard} is cut short ({cut}): {len(samples)} samples indexed before the cut",
                      stacklevel=2)
    if not samples:
        raise UserError(f"{shard} holds no samples (members named KEY.jpg/png and KEY.cls)")
    return samples


def _cache_file(shard: str) -> Path:
    root = Path(os.environ.get("VITSCALE_CACHE") or Path.home() / ".cache" / "vitscale")
    return root / "tar-index" / (hashlib.sha1(shard.encode()).hexdigest() + ".json")


def shard_index(shard: str) -> list[list]:
    """`index_tar` of a shard, cached in this process and on disk (best effort) by path, size, mtime."""
    path = str(Path(shard).resolve())
    st = os.stat(path)
    stamp = (path, st.st_size, st.st_mtime_ns)
    if stamp in _indexes:
        return _indexes[stamp]
    cache = _cache_file(path)
    samples = None
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == [*stamp, INDEX_VERSION]:
            samples = saved["samples"]
    except (OSError, ValueError, AttributeError):
        pass
    if samples is None:
        samples = index_tar(shard)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"stamp": [*stamp, INDEX_VERSION], "samples": samples}))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: index again next time
    _indexes[stamp] = samples
    return samples


def read_shards(spec: str, field: str) -> tuple[list[str], list[tuple[Member, ...]]]:
    """(shard paths, samples (where, label, shard number, offset, size)) of a spec, in shard order."""
    paths = shard_paths(spec, field)
    samples = [(f"{p}:{key}.{ext}", label, n, offset, size)
               for n, p in enumerate(paths) for key, ext, offset, size, label in shard_index(p)]
    return paths, samples


def shard_classes(splits: dict[str, list[Member]], declared: int) -> tuple[str, ...]:
    """Class names "0" .. "K-1": K = `declared` or the training shards' distinct labels, which
    must then be exactly 0 .. K-1; every label of every split must be below K."""
    first = next(iter(splits))
    k = declared or len({s[1] for s in splits[first]})
    rule = (f"labels must be below data.num_classes={declared}; raise it or fix the label" if declared else
            f"the training shards use {k} distinct labels, so labels must be 0..{k - 1}; renumber them, "
            "or set data.num_classes=N when some class ids have no training samples")
    for samples in splits.values():
        bad = next((s for s in samples if s[1] >= k), None)
        if bad:
            raise UserError(f"{bad[0]}: label {bad[1]} is no class id: {rule}")
    return tuple(str(i) for i in range(k))


class TarImages(ImageFiles):
    """Images read from tar shards by seeking: samples are (where, label, shard, offset, size)."""

    def __init__(self, shards: list[str], samples: list[Member], classes: tuple[str, ...],
                 transform: ClipTransform, train: bool, strict: bool = False):
        super().__init__(samples, classes, transform, train, strict)
        self.shards = shards
        self._files: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}  # handles stay in their process

    def source(self, index: int) -> io.BytesIO:
        """The image member's bytes, read through this process's own handle on its shard."""
        _, _, shard, offset, size = self.samples[index]
        if self._pid != os.getpid():  # a forked worker: its parent's handles share file offsets
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.pop(shard, None) or open(self.shards[shard], "rb")  # noqa: SIM115
        self._files[shard] = f
        while len(self._files) > OPEN_SHARDS:
            self._files.popitem(last=False)[1].close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard truncated: {size - len(data)} of its {size} bytes are missing")
        return io.BytesIO(data)


def build_shards(cfg, train_tf: ClipTransform,
                 eval_tf: ClipTransform) -> tuple[KeyedDataset, KeyedDataset, KeyedDataset]:
    """(train, val, test) of data.name=webdataset: data.val_path / data.test_path shards, else
    seeded stratified shares of the training shards (as image-folder)."""
    fields = {"data.path": cfg.path, "data.val_path": cfg.val_path, "data.test_path": cfg.test_path}
    read = {f: read_shards(spec, f) for f, spec in fields.items() if spec}
    shards = {f: paths for f, (paths, _) in read.items()}
    classes = shard_classes({f: s for f, (_, s) in read.items()}, cfg.num_classes)
    splits = split_rest(cfg, *(read[f][1] if f in read else None for f in fields))
    datasets = []
    for f, samples, tf in zip(fields, splits, (train_tf, eval_tf, eval_tf), strict=True):
        f = f if f in read else "data.path"  # a share of the training shards
        datasets.append(TarImages(shards[f], samples, classes, tf, tf is train_tf, cfg.strict))
        probe(datasets[-1], fields[f])
    return tuple(datasets)
