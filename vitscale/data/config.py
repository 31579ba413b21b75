"""The data section of a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vitscale.common.errors import UserError
from vitscale.data.randaugment import RandAugment
from vitscale.data.views import parse_views

NAMES = ("digits", "moving-digits", "cluttered-digits", "image-folder", "video-folder", "video-csv",
         "webdataset")
REAL = ("image-folder", "video-folder", "video-csv", "webdataset")
VIDEO = ("moving-digits", "video-folder", "video-csv")  # data that can give clips (data.frames > 1)
BUILTIN_SIZE = 32  # the built-in data's side in pixels when data.image_size is 0 (their native size)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_MEAN = (0.5, 0.5, 0.5)
BUILTIN_STD = (0.5, 0.5, 0.5)
MAX_SAMPLE_BYTES = 512 << 20  # one float32 sample (3 x frames x size^2 x 4 bytes): 6,500 px or 16 x 1,600 px
MAX_CLASSES = 100_000  # a declared class count above this is a typo (ImageNet-21k has 21,841)
MAX_ITEMS = 10_000_000  # generated items per split: an epoch's order is a permutation held in memory
MAX_CANVAS = 256  # cluttered-digits draws 1,024 canvases at once: 256 MB of noise at 256 px


@dataclass(frozen=True)
class DataConfig:
    # built-in data, nothing to download (digits: scikit-learn's 8x8 handwritten digits;
    # moving-digits, cluttered-digits: made from them), or real data at data.path: image-folder,
    # video-folder, video-csv or webdataset
    name: str = "digits"

    # real data: a folder of class subfolders; a video list (`path,label` lines, or VideoMAE V2's
    # `path start count [label]`: clips from those frames, count -1 = to the end); or webdataset tar
    # shards (train-{000000..000099}.tar, a folder of .tar files, or a comma list)
    path: str = ""
    val_path: str = ""  # a separate validation folder / list / shards; "" = a seeded split of val_fraction
    val_fraction: float = 0.2  # the share held out for validation when val_path is empty (0 = none)
    test_path: str = ""  # a separate test folder / list / shards (real data); "" = a split of test_fraction

    # the share held out as the test split (reported, never selected on) when test_path is empty;
    # -1 = by data: 0.1 for digits and moving-digits, none for real data (cluttered-digits: test_size)
    test_fraction: float = -1.0

    # video-csv, webdataset: class ids 0..N-1 (some may have no items); 0 = as many as the distinct
    # labels found
    num_classes: int = 0
    image_size: int = 0  # output height = width in pixels; 0 = the model's (its preset's resolution, e.g.
    # 224 for Ti/16) on real data, 32 on the built-ins (their own size); another size is allowed, and
    # the model then takes the data's (the run's log says so)
    frames: int = 0  # frames per clip; 1 = images ([C, H, W]), >1 = clips ([C, T, H, W]); 0 = the model's
    # on video data (its preset's, e.g. 16 for S/16-f16), 1 on image data
    frame_stride: int = 2  # distance between the frames sampled from a real video (2 = every other frame)
    label: str = "digit"  # moving-digits: what a clip is labelled by, its "digit" or its motion "direction"
    num_clips: int = 2000  # moving-digits: clips generated, train + val
    digits_per_clip: int = 1  # moving-digits: 1, or 2 (the second a dim distractor)
    train_size: int = 100_000  # cluttered-digits: training samples generated (one epoch)

    # cluttered-digits: validation samples generated; 10,000 keeps the top-1 standard error at or
    # under 0.5 points
    val_size: int = 10_000
    test_size: int = 10_000  # cluttered-digits: test samples generated, of held-out digits (0 = none)
    canvas: int = 32  # cluttered-digits: the side in pixels a scene is drawn at, then resized to image_size

    # random resized crop: the smallest crop as a share of the frame's area; 0 = by data: 0.8 for
    # built-ins (small digits are cropped gently), real_scale_min for real data (the recipes set 0)
    scale_min: float = 0.35

    # real data's smallest crop share when scale_min is 0: 0.08, as DeiT and MAE fine-tuning (the
    # pretrain recipe sets 0.2, as MAE pre-training)
    real_scale_min: float = 0.08

    # random horizontal flips; auto = on for real data, off for built-ins (digits and motion
    # directions must not be mirrored)
    hflip: bool | str = "auto"

    # how crops are resized: bilinear or bicubic; auto = bicubic for real data (as MAE and DeiT),
    # bilinear for built-ins
    interpolation: str = "auto"
    randaugment: str = ""  # a timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (DeiT's); "" = off

    # brightness / contrast / saturation jitter strength (0 = off; DeiT: 0.4); unused with
    # randaugment, as in timm
    color_jitter: float = 0.0

    # random erasing probability (0 = off; DeiT: 0.25): one box of an image replaced by N(0, 1)
    # noise, pixel by pixel
    erase_prob: float = 0.0

    # repeated augmentation: each image this many times an epoch, augmented each time (1 = off;
    # DeiT: 3)
    repeated_aug: int = 1

    # evaluation center crop as a share of the shorter side (real data): 0.875, the usual 224 of
    # 256 of ImageNet evaluation
    eval_crop: float = 0.875

    # test report: CLIPSxCROPS views averaged per item (1x1 = one center view; VideoMAE reports 5x3
    # on Kinetics, 2x3 on Something-Something V2)
    test_views: str = "1x1"
    mean: tuple[float, ...] = ()  # per-channel mean to normalise by; empty = ImageNet's (real data), 0.5
    std: tuple[float, ...] = ()  # per-channel std to normalise by; empty = ImageNet's (real data), 0.5
    workers: int = 0  # DataLoader worker processes (0 = load in the main process)

    # video decoder threads per loading process (PyAV frame threading); 0 = the node's CPUs shared
    # among its ranks and data.workers (at most 8); 1 = one thread
    decode_threads: int = 0
    strict: bool = False  # stop at an unreadable file instead of skipping it
    seed: int = 0  # dataset seed: the seeded train / val / test split and moving-digits generation

    def __post_init__(self) -> None:
        # every check is built first; the first to fail, in this order, is the error reported
        checks = [*self._source_checks(), *self._split_checks(), *self._item_checks(),
                  *self._label_checks(), *self._generated_checks(), *self._augment_checks(),
                  *self._loading_checks()]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        parse_views(self.test_views)  # raises naming data.test_views

    def _source_checks(self) -> list[tuple[object, str]]:
        """The data's name, and the path real data needs."""
        real = self.name in REAL
        return [
            (self.name in NAMES, f"data.name must be one of {', '.join(NAMES)}, got {self.name!r}"),
            (not real or self.path, f"data.name={self.name!r} needs data.path=FOLDER_OR_CSV"),
        ]

    def _split_checks(self) -> list[tuple[object, str]]:
        """The validation and test splits: their fractions, paths and sizes."""
        real = self.name in REAL
        return [
            (0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1), e.g. 0.2"),
            (self.test_fraction == -1.0 or 0.0 <= self.test_fraction < 1.0,
             f"data.test_fraction must be in [0, 1), or -1 for the data's default, got {self.test_fraction}"),
            (self.val_fraction + self.test_share < 1.0,
             f"data.val_fraction + data.test_fraction must be below 1 (nothing left to train on), got "
             f"{self.val_fraction:g} + {self.test_share:g}"),
            (not self.test_path or real,
             "data.test_path is for real data; built-ins hold out their own (data.test_fraction)"),
            (not (self.test_path and self.test_fraction > 0),
             "set data.test_path or data.test_fraction, not both"),
            (self.name != "cluttered-digits" or self.test_fraction == -1.0,
             "cluttered-digits generates its test set: set data.test_size (0 = none), "
             "not data.test_fraction"),
            (0 <= self.test_size <= MAX_ITEMS,
             f"data.test_size must be 0 (none) to {MAX_ITEMS:,}, got {self.test_size}"),
        ]

    def _item_checks(self) -> list[tuple[object, str]]:
        """What one item is: its class count, image size and frames."""
        return [
            (0 <= self.num_classes <= MAX_CLASSES,
             f"data.num_classes must be 0 (the labels' count) to {MAX_CLASSES}, got {self.num_classes}"),
            (self.num_classes == 0 or self.name in ("video-csv", "webdataset"),
             "data.num_classes is for data.name=video-csv or webdataset (a folder has a class per "
             "subfolder); leave it 0"),
            (self.image_size == 0 or self.image_size >= 8,
             f"data.image_size must be at least 8 (or 0: the model's), got {self.image_size}"),
            (self.sample_bytes <= MAX_SAMPLE_BYTES,
             f"data.image_size={self.image_size} with data.frames={self.frames} makes one sample a "
             f"{self.sample_bytes / 2**30:.3g} GB tensor (at most {MAX_SAMPLE_BYTES >> 20} MB); lower them"),
            (self.frames >= 0, f"data.frames must be at least 1 (or 0: the model's), got {self.frames}"),
            (self.frame_stride >= 1, f"data.frame_stride must be at least 1, got {self.frame_stride}"),
        ]

    def _label_checks(self) -> list[tuple[object, str]]:
        """Labels, flips and frames: what images and clips each allow."""
        return [
            (self.label in ("digit", "direction"),
             f"data.label must be 'digit' or 'direction', got {self.label!r}"),
            (self.label == "digit" or self.name == "moving-digits",
             "data.label='direction' exists only for data.name=moving-digits"),
            (self.label == "digit" or self.frames != 1,
             "data.label='direction' needs motion: set data.frames to 2 or more"),
            (self.hflip in (True, False, "auto"),
             f"data.hflip must be true, false or auto, got {self.hflip!r}"),
            (not (self.hflip is True and self.label == "direction"),
             "data.hflip would mirror the motion and break direction labels; set data.hflip=false"),
            (self.name not in ("image-folder", "webdataset") or self.frames <= 1,
             f"{self.name} gives single images; set data.frames=1 or use a video dataset"),
            (self.name != "digits" or self.frames <= 1,
             "digits are single images; set data.frames=1 or use data.name=moving-digits"),
            (self.name != "cluttered-digits" or self.frames <= 1,
             "cluttered-digits are single images; set data.frames=1 or use data.name=moving-digits"),
        ]

    def _generated_checks(self) -> list[tuple[object, str]]:
        """The sizes of the generated built-in data."""
        return [
            (1 <= self.train_size <= MAX_ITEMS,
             f"data.train_size must be 1 to {MAX_ITEMS:,}, got {self.train_size}"),
            (1 <= self.val_size <= MAX_ITEMS,
             f"data.val_size must be 1 to {MAX_ITEMS:,}, got {self.val_size}"),
            (16 <= self.canvas <= MAX_CANVAS,
             f"data.canvas must be 16 to {MAX_CANVAS} px (it is resized to image_size), got {self.canvas}"),
            (2 <= self.num_clips <= MAX_ITEMS,
             f"data.num_clips must be 2 to {MAX_ITEMS:,}, got {self.num_clips}"),
            (self.digits_per_clip in (1, 2),
             f"data.digits_per_clip must be 1 or 2, got {self.digits_per_clip}"),
        ]

    def _augment_checks(self) -> list[tuple[object, str]]:
        """The crop, resize and augmentation settings, and the evaluation crop."""
        return [
            (0.0 <= self.scale_min <= 1.0,
             f"data.scale_min must be in (0, 1], or 0 for the data's default, got {self.scale_min}"),
            (0.0 < self.real_scale_min <= 1.0,
             f"data.real_scale_min must be in (0, 1], got {self.real_scale_min}"),
            (self.interpolation in ("auto", "bilinear", "bicubic"),
             f"data.interpolation must be auto, bilinear or bicubic, got {self.interpolation!r}"),
            (self.randaugment == "" or _spec_ok(self.randaugment),
             f"data.randaugment must be a spec like rand-m9-mstd0.5-inc1 (inc1 required) or empty, "
             f"got {self.randaugment!r}"),
            (0.0 <= self.color_jitter <= 1.0,
             f"data.color_jitter must be in [0, 1] (0 = off), got {self.color_jitter}"),
            (0.0 <= self.erase_prob <= 1.0,
             f"data.erase_prob must be in [0, 1] (0 = off), got {self.erase_prob}"),
            (1 <= self.repeated_aug <= 64,
             f"data.repeated_aug must be 1 (off) to 64 copies per image, got {self.repeated_aug}"),
            (0.0 < self.eval_crop <= 1.0, f"data.eval_crop must be in (0, 1], got {self.eval_crop}"),
        ]

    def _loading_checks(self) -> list[tuple[object, str]]:
        """Normalisation and the loading processes and threads."""
        return [
            (len(self.mean) in (0, 3), f"data.mean needs 3 values or none, got {self.mean}"),
            (len(self.std) in (0, 3), f"data.std needs 3 values or none, got {self.std}"),
            (all(math.isfinite(m) for m in self.mean), f"data.mean values must be finite, got {self.mean}"),
            (all(0 < s < math.inf for s in self.std),
             f"data.std values must be positive and finite, got {self.std}"),
            (self.workers >= 0, f"data.workers must be 0 or more, got {self.workers}"),
            (self.decode_threads >= 0,
             f"data.decode_threads must be 0 (auto) or more, got {self.decode_threads}"),
        ]

    def sized(self, side: int = BUILTIN_SIZE, frames: int = 1) -> DataConfig:
        """This config with its input shape decided: a given data.image_size / data.frames stays; a
        0 takes BUILTIN_SIZE on built-in data, else `side` (the model's: train.inputs.settle passes it),
        and `frames` (the model's) on video data, 1 on image data."""
        size = self.image_size or (BUILTIN_SIZE if self.is_builtin else side)
        return replace(self, image_size=size, frames=self.frames or (frames if self.name in VIDEO else 1))

    @property
    def sample_bytes(self) -> int:
        """Bytes of one float32 sample: 3 x frames x image_size^2 x 4 (frames 0, the model's, counts
        as at least one)."""
        return 3 * max(self.frames, 1) * self.image_size**2 * 4

    @property
    def is_builtin(self) -> bool:
        return self.name in ("digits", "moving-digits", "cluttered-digits")

    @property
    def flip(self) -> bool:
        """Resolved hflip: the configured value, or on for real data and off for built-ins."""
        return (not self.is_builtin) if self.hflip == "auto" else bool(self.hflip)

    @property
    def resize_mode(self) -> str:
        """Resolved interpolation: bicubic for real data, bilinear for built-ins unless set."""
        if self.interpolation == "auto":
            return "bilinear" if self.is_builtin else "bicubic"
        return self.interpolation

    @property
    def crop_scale(self) -> float:
        """Resolved scale_min: the configured value, or the data's default when it is 0."""
        return self.scale_min or (0.8 if self.is_builtin else self.real_scale_min)

    @property
    def test_share(self) -> float:
        """Resolved test_fraction: the configured share, or 0.1 for digits / moving-digits and 0 for
        the rest when it is -1 (cluttered-digits generates test_size samples instead)."""
        if self.test_fraction != -1.0:
            return self.test_fraction
        return 0.1 if self.name in ("digits", "moving-digits") else 0.0

    @property
    def has_test(self) -> bool:
        """Whether the data holds a test split (what a run's end and a study report on)."""
        if self.name == "cluttered-digits":
            return self.test_size > 0
        return bool(self.test_path) or self.test_share > 0

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Resolved (mean, std): the configured values or the dataset default."""
        mean_default, std_default = (BUILTIN_MEAN, BUILTIN_STD) if self.is_builtin else (
            IMAGENET_MEAN, IMAGENET_STD)
        return tuple(self.mean or mean_default), tuple(self.std or std_default)


def _spec_ok(spec: str) -> bool:
    try:
        policy = RandAugment.parse(spec)
    except ValueError:
        return False
    return 0 <= policy.magnitude <= 10 and 1 <= policy.layers <= 16 and 0 <= policy.prob <= 1
