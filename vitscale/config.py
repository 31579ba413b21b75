"""Run configs: frozen dataclasses, YAML files, and `--section.key=value` overrides.

A run config has one section per concern (`model`, `data`, `train`, `mae`) plus the task.
Overrides are parsed against the field's declared type, so `--train.epochs=ten` fails
with one line instead of training with a string. The resolved config is saved as
`config.yaml` in every run directory; `--config runs/x/config.yaml` reproduces the run.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import yaml

from vitscale.data.config import DataConfig
from vitscale.errors import UserError
from vitscale.models.mae import MAEConfig
from vitscale.models.vit import ViTConfig, preset
from vitscale.optim import SCHEDULES

TASKS = ("supervised", "mae", "finetune", "linprobe")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training set
    batch: int = 128  # global batch per optimizer step (all ranks and accumulation steps)
    accum: int = 1  # gradient accumulation steps per optimizer step
    base_lr: float = 1e-3  # learning rate per 256 samples: lr = base_lr * batch / 256
    min_lr: float = 1e-6  # where the LR schedule ends
    warmup_epochs: float = 2.0  # linear warm-up length (rounded to whole steps; the same for any run length)
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay: constant LR, then a short decay)
    decay_frac: float = 0.2  # wsd: share of the run's steps spent decaying to min_lr as 1 - sqrt;
    # 0 = never decay (a stable run to branch cooldowns from; see optim.decay_start)
    weight_decay: float = 0.05  # AdamW decay (not on norms, biases, tokens, position tables)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (MAE pre-training uses 0.95)
    layer_decay: float = 1.0  # layer-wise LR decay for fine-tuning (1.0 = off; MAE uses 0.75)
    clip_grad: float = 0.0  # max gradient norm (0 = off)
    label_smoothing: float = 0.1  # supervised cross-entropy smoothing
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off); with both, each batch picks one
    dtype: str = "fp32"  # "fp32" or "bf16" autocast
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    fsdp: bool = False  # shard parameters with FSDP (fully_shard) across ranks
    seed: int = 0  # seeds init, data order, augmentation and masking
    threads: int = 0  # torch intra-op threads (0 = PyTorch's default)
    ckpt_every: int = 0  # also checkpoint every N optimizer steps (0 = each epoch only)
    keep_last: int = 2  # checkpoints kept besides the best and keep_steps
    keep_steps: tuple[int, ...] = ()  # also checkpoint at these optimizer steps and never prune them
    branch_from: str = ""  # a checkpoint directory (RUN/ckpt-STEP) to start from when this run has none:
    # weights, optimizer, RNG and step, as a resume (a cooldown branch of a wsd stable run)
    knn_k: int = 20  # k for the k-NN accuracy of pre-trained features (0 = off)
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); for tests

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise UserError(f"train.decay_frac must be in [0, 1], got {self.decay_frac}")
        if any(s < 1 for s in self.keep_steps):
            raise UserError(f"train.keep_steps must be optimizer steps of 1 or more, got {self.keep_steps}")


@dataclass(frozen=True)
class RunConfig:
    task: str = "supervised"  # supervised | mae | finetune | linprobe
    model: ViTConfig = field(default_factory=lambda: preset("pico/4"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    init: str = ""  # weights to start from: a run directory, a transformers directory, a timm / MAE /
    # VideoMAE / vitscale .safetensors or .pth file (see vitscale.weights), or "random" (baseline)
    init_allow: str = ""  # comma-separated fnmatch patterns of keys --init may leave missing or unused
    out: str = "runs/run"  # run directory

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task in ("finetune", "linprobe") and not self.init:
            raise UserError(f"task {self.task!r} needs weights: pass --init RUN_DIR_OR_FILE "
                             "(or --init random for a baseline)")


# Per-command defaults (the CLI's when no --config is given, and the study's trials): each
# trains on built-in data in minutes on two CPU cores. --section.key=value overrides any of it.
BUILTIN = ["train.batch=64", "data.scale_min=0.8"]  # 8x8 digits: crop gently
RECIPES = {
    "train": ["task=supervised", *BUILTIN, "train.epochs=40", "train.base_lr=4e-3", "train.warmup_epochs=3"],
    "pretrain": ["task=mae", *BUILTIN, "train.epochs=60", "train.base_lr=4e-3", "train.betas=0.9,0.95",
                 "train.warmup_epochs=5", "train.label_smoothing=0", "mae.decoder_width=64",
                 "mae.decoder_depth=2", "mae.decoder_heads=2", "mae.norm_pix_loss=false"],
    "finetune": ["task=finetune", *BUILTIN, "train.epochs=20", "train.base_lr=4e-3", "train.layer_decay=0.75",
                 "train.warmup_epochs=2"],
    "linprobe": ["task=linprobe", *BUILTIN, "train.epochs=30", "train.base_lr=0.4", "train.weight_decay=0",
                 "train.warmup_epochs=2", "train.label_smoothing=0"],
}


def recipe(command: str, **fields) -> RunConfig:
    """The default run config of a command ("train", "pretrain", "finetune", "linprobe")."""
    return apply_overrides(RunConfig(**fields), RECIPES[command])


# ----------------------------------------------------------------------------- typed parsing
def _parse(text: str, tp, where: str):
    """Parse a string as type `tp` (bool, int, float, str, tuples, unions with None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse(text, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise UserError(errors[-1])
    if origin is tuple:
        parts = [p for p in re.split(r"[,x]", text) if p]  # "0.9,0.95" or "224x160"
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(p, args[0], where) for p in parts)
        if len(parts) != len(args):
            raise UserError(f"{where} needs {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse(p, a, where) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where} must be true or false, got {text!r}")
    try:
        return tp(text)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be {tp.__name__}, got {text!r}") from None


def _coerce(value, tp, where: str):
    """Check / convert a YAML value to the field type."""
    if isinstance(value, str) and tp is not str:
        return _parse(value, tp, where)
    if isinstance(value, list):
        return _parse(",".join(str(v) for v in value), tp, where)
    if typing.get_origin(tp) is tuple or tp in (int, float, bool, str):
        return _parse(str(value), tp, where)
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    hints, known = _hints(cls), {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        name = f"{where}{key}"
        if key not in known:
            raise UserError(f"unknown config key {name!r}; known: {', '.join(sorted(known))}")
        tp = hints[key]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config section {name!r} must be a mapping")
            kwargs[key] = from_dict(tp, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists) for YAML."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {f.name: to_dict(getattr(cfg, f.name)) if is_dataclass(getattr(cfg, f.name))
            else plain(getattr(cfg, f.name)) for f in fields(cfg)}


def apply_overrides(cfg, overrides: list[str]):
    """Apply `section.key=value` strings (leading dashes optional) to a config."""
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep:
            raise UserError(f"override {item!r} must look like --section.key=value")
        cfg = _set(cfg, key.split("."), text, key)
    return cfg


def _set(cfg, path: list[str], text: str, full: str):
    names = {f.name for f in fields(cfg)}
    if path[0] not in names:
        raise UserError(f"unknown config key {full!r}; known here: {', '.join(sorted(names))}")
    tp, current = _hints(type(cfg))[path[0]], getattr(cfg, path[0])
    if len(path) == 1:
        if is_dataclass(tp):
            raise UserError(f"{full!r} is a section; set one of its keys, e.g. --{full}.KEY=VALUE")
        return replace(cfg, **{path[0]: _parse(text, tp, full)})
    if not is_dataclass(current):
        raise UserError(f"{'.'.join(full.split('.')[:-1])!r} has no sub-keys")
    return replace(cfg, **{path[0]: _set(current, path[1:], text, full)})


def load_yaml(path: str | Path, cls=RunConfig):
    """Read a config YAML (a run config unless `cls` says; missing keys take their defaults)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of sections")
    return from_dict(cls, data)


def dump_yaml(cfg, leave_out: tuple[str, ...] = ()) -> str:
    """A config as YAML, without the top-level fields `leave_out` (a run's or study's `out`:
    a directory is where it is, not where its config says)."""
    return yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k not in leave_out}, sort_keys=False)


# What a run's (a study's) directory holds beside the config vitscale saved there.
_WORK = {"config.yaml": ("metrics.jsonl", "final.json", "ckpt-*"), "study.yaml": ("trials", "sweep")}


def home(path: str | Path) -> str | None:
    """The directory a run's config.yaml (a study's study.yaml) lies in when it holds that run's
    (study's) work: the run resumes there, wherever it was made. None for any other file."""
    p = Path(path)
    return str(p.parent) if any(any(p.parent.glob(m)) for m in _WORK.get(p.name, ())) else None


def with_preset(cfg: RunConfig, name: str) -> RunConfig:
    """Replace the model section by a preset's architecture."""
    return replace(cfg, model=preset(name))


__all__ = ["RunConfig", "TrainConfig", "TASKS", "apply_overrides", "dump_yaml", "from_dict",
           "load_yaml", "to_dict", "with_preset"]
