"""Run configs: frozen dataclasses, YAML files, and `--section.key=value` overrides.

A run config has one section per concern (`model`, `data`, `train`, `mae`, `distill`) plus the task.
Overrides are parsed against the field's declared type, so `--train.epochs=ten` fails
with one line instead of training with a string. The resolved config is saved as
`config.yaml` in every run directory; `--config runs/x/config.yaml` reproduces the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from vitscale.common.device import DTYPES, check_device
from vitscale.common.errors import UserError
from vitscale.common.records import (
    apply_overrides,
    dump_yaml,
    from_dict,
    merge,
    read_mapping,
    set_item,
    shown,
    to_dict,
    typed,
)
from vitscale.common.rundir import FINAL, METRICS, RUN, STUDY
from vitscale.data.config import DataConfig
from vitscale.models.mae import MAEConfig
from vitscale.models.presets import preset
from vitscale.models.vit import ViTConfig
from vitscale.train.loggers import BACKENDS as LOGGERS
from vitscale.train.optim import OPTIMIZERS, SCHEDULES
from vitscale.train.steps import CYCLES


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # passes over the training set
    batch: int = 128  # samples per optimizer step, over all ranks and accumulation steps

    # micro-batches each optimizer step is split into (batch / accum samples each): the same
    # training in less memory
    accum: int = 1

    # learning rate per 256 samples: the rate used is base_lr x batch / 256, so that a change of
    # batch keeps the step size per sample
    base_lr: float = 1e-3
    min_lr: float = 1e-6  # the learning rate the schedule ends at
    warmup_epochs: float = 2.0  # linear warm-up from 0 in epochs (whole steps): the same at any run length

    # cosine: decay from the peak to min_lr over the whole run; wsd (warmup-stable-decay): hold the
    # peak, then decay over the run's last decay_frac (a stable run can branch cooldowns)
    schedule: str = "cosine"

    # wsd: the share of the run's steps spent decaying to min_lr (as 1 - sqrt); 0 = never decay (a
    # stable run to branch cooldowns from, as the study does)
    decay_frac: float = 0.2
    weight_decay: float = 0.05  # AdamW weight decay (not on norms, biases, tokens, position tables)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's betas (the pretrain recipe's are MAE's 0.9,0.95)
    optimizer: str = "adamw"  # adamw, or lars: SGD, momentum betas[0], a per-layer trust ratio (MAE's probe)

    # decay of an exponential moving average of the weights (0 = off; e.g. 0.9999); the average is
    # evaluated beside the weights (ema_* metrics) and can be exported instead of them
    ema: float = 0.0

    # layer-wise LR decay: each block learns at this times the rate of the block above it, so early
    # blocks of a pre-trained encoder change least (1 = off; the finetune recipe's 0.75 is MAE's)
    layer_decay: float = 1.0
    clip_grad: float = 0.0  # clip the gradients' global norm to this (0 = off)
    label_smoothing: float = 0.1  # cross-entropy label smoothing of supervised training (0 = off)
    mixup: float = 0.0  # mixup alpha: mix pairs of samples and their labels (0 = off; DeiT uses 0.8)

    # cutmix alpha: paste a box of one sample into another, labels mixed by area (0 = off; DeiT
    # uses 1.0); with mixup too, each batch takes one of the two
    cutmix: float = 0.0

    # multi-resolution training (ResFormer): each optimizer step resizes its batch to one of these
    # sides in pixels, drawn from (seed, step); empty = off
    resolutions: tuple[int, ...] = ()

    # Multigrid training (Wu et al. 2020): long and/or short cycles of coarse steps (more samples at
    # fewer frames or smaller sides, each about a base step's compute); empty = off
    multigrid: tuple[str, ...] = ()

    # fp32, or autocast to bf16 or fp16 (fp16 with a dynamic loss scale); bf16 keeps fp32's range
    # and needs no loss scale
    dtype: str = "fp32"
    compile: bool = False  # torch.compile the model: faster steps after a compilation at the start

    # activation checkpointing: each transformer block is recomputed in backward, for less memory at
    # about one more forward pass
    act_ckpt: bool = False

    # the device's dense peak TFLOPS at train.dtype, for the MFU in the log and metrics (0 = the table
    # in vitscale.cost.mfu for known GPUs; no MFU on a CPU unless given)
    peak_tflops: float = 0.0
    device: str = "auto"  # auto (CUDA if there is one, else the CPU), cpu, cuda, cuda:N or mps

    # shard parameters, gradients and optimizer state across ranks with FSDP (fully_shard): for
    # models too large for a whole copy on each rank (DDP, the default)
    fsdp: bool = False

    # with train.fsdp: each rank writes its own shards of the weights and optimizer state
    # (torch.distributed.checkpoint), never gathered on one rank; resumes on any number of ranks
    sharded_ckpt: bool = False
    seed: int = 0  # seeds initialisation, data order, augmentation and masking: one seed, one run
    threads: int = 0  # torch intra-op CPU threads (0 = PyTorch's default)
    ckpt_every: int = 0  # also checkpoint every N optimizer steps (0 = at the end of each epoch only)
    keep_last: int = 2  # checkpoints kept besides the best and keep_steps (older ones are deleted)
    keep_steps: tuple[int, ...] = ()  # also checkpoint at these optimizer steps, and never delete them

    # a checkpoint directory (RUN/ckpt-STEP) to start from when this run has none of its own: its
    # weights, optimizer, RNG and step, as a resume does (a cooldown branched from a wsd stable run)
    branch_from: str = ""
    knn_k: int = 20  # neighbours of the k-NN accuracy that scores pre-trained features (0 = off)
    max_steps: int = 0  # stop after this many optimizer steps (0 = run every epoch): for quick checks

    # linear probe: the S² scales whose features are concatenated; 1 = the image, 2 adds the image
    # upsampled 2x and cut into 2x2 tiles of the base size
    probe_scales: tuple[int, ...] = (1,)

    # where metric rows go besides metrics.jsonl (always written): any of csv, tensorboard, wandb,
    # mlflow. W&B and MLflow keep their runs in the run directory (RUN/wandb offline, RUN/mlruns)
    # unless their own variables say otherwise (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, ...)
    loggers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        least = {"epochs": 1, "batch": 1, "accum": 1, "threads": 0, "ckpt_every": 0, "keep_last": 0,
                 "knn_k": 0, "max_steps": 0, "min_lr": 0, "warmup_epochs": 0, "weight_decay": 0,
                 "clip_grad": 0, "mixup": 0, "cutmix": 0}  # (a NaN fails every comparison)
        checks = [(getattr(self, k) >= low, f"train.{k} must be at least {low}, got {getattr(self, k)}")
                  for k, low in least.items()]
        checks += [
            (self.base_lr >= 0, f"train.base_lr must be 0 (frozen) or more, got {self.base_lr}"),
            (self.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got "
             f"{self.schedule!r}"),
            (0.0 <= self.ema < 1.0, f"train.ema must be in [0, 1) (0 = off), got {self.ema}"),
            (not (self.ema and self.fsdp), "train.ema cannot be used with train.fsdp yet; use DDP "
             "(leave train.fsdp off) or set train.ema=0"),
            (self.fsdp or not self.sharded_ckpt, "train.sharded_ckpt needs train.fsdp=true (without FSDP "
             "every rank holds the whole state); set both, or leave train.sharded_ckpt off"),
            (self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
             f"{self.optimizer!r}"),
            (0.0 <= self.decay_frac <= 1.0, f"train.decay_frac must be in [0, 1], got {self.decay_frac}"),
            (len(self.probe_scales) >= 1 and all(s >= 1 for s in self.probe_scales)
             and len(set(self.probe_scales)) == len(self.probe_scales),
             f"train.probe_scales must be distinct whole scales of 1 or more (e.g. 1,2), got "
             f"{self.probe_scales}"),
            (all(s >= 1 for s in self.keep_steps),
             f"train.keep_steps must be optimizer steps of 1 or more, got {self.keep_steps}"),
            (all(0.0 <= b < 1.0 for b in self.betas), f"train.betas must be in [0, 1), got {self.betas}"),
            (0.0 < self.layer_decay <= 1.0, f"train.layer_decay must be in (0, 1], got {self.layer_decay}"),
            (0.0 <= self.label_smoothing < 1.0,
             f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.peak_tflops >= 0, f"train.peak_tflops must be 0 (the table's) or a peak in TFLOPS, got "
             f"{self.peak_tflops}"),
            (self.dtype in DTYPES, f"train.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (all(r >= 1 for r in self.resolutions) and len(set(self.resolutions)) == len(self.resolutions),
             f"train.resolutions must be distinct image sides of 1 or more (e.g. 24,32,40), "
             f"got {self.resolutions}"),
            (set(self.multigrid) <= set(CYCLES) and len(set(self.multigrid)) == len(self.multigrid),
             f"train.multigrid must be long, short or long,short (empty = off), got {self.multigrid}"),
            (0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}"),
            (set(self.loggers) <= set(LOGGERS), f"train.loggers must be among {', '.join(LOGGERS)} "
             f"(e.g. csv,tensorboard), got {self.loggers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        check_device(self.device, "train.device")


DISTILL_KINDS = ("soft", "hard", "both", "feature")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # task distill: the frozen teacher, a run directory or weights (see vitscale.weights)

    # soft: KL divergence to the teacher's logits at a temperature; hard: cross-entropy to its top
    # class (DeiT); both: the mean of the two; feature: the student's tokens predict the teacher's
    # (G2SD's generic stage: no labels needed)
    kind: str = "soft"
    alpha: float = 0.5  # soft / hard: loss = (1 - alpha) x label loss + alpha x distillation loss

    # soft: both logits are divided by T and the KL multiplied by T^2 (DeiT's tau); 1 = the logits
    # as they are
    temperature: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.kind in DISTILL_KINDS, f"distill.kind must be one of {', '.join(DISTILL_KINDS)}, got "
             f"{self.kind!r}"),
            (0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha}"),
            (self.temperature > 0, f"distill.temperature must be positive, got {self.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class RunConfig:
    # the task, set by the command: supervised (train), mae (pretrain), finetune, linprobe
    # (finetune --linear-probe) or distill
    task: str = "supervised"

    # the architecture, a preset's (--model); its input shape and classes are settled with the data,
    # and the run's first line says them
    model: ViTConfig = field(default_factory=lambda: preset("pico/4"))
    data: DataConfig = field(default_factory=DataConfig)  # what it trains on; how it is read and augmented
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, schedule, precision, checkpoints
    mae: MAEConfig = field(default_factory=MAEConfig)  # masking and decoder of MAE / VideoMAE pre-training
    distill: DistillConfig = field(default_factory=DistillConfig)  # the teacher and loss of task distill

    # weights to start from: a run directory, a transformers directory, a timm / MAE / VideoMAE /
    # vitscale .safetensors or .pth file (see vitscale.weights), or "random" (a from-scratch baseline)
    init: str = ""
    init_allow: str = ""  # comma-separated key patterns (fnmatch) the init weights may lack or not use

    # the run directory (--out; never a config file's): a new or empty folder, or this run's, which
    # resumes; never the filesystem root, a home directory, a folder of other files or the data
    out: str = "runs/run"

    def __post_init__(self) -> None:
        from vitscale import tasks  # (tasks import the models this module configures)

        task = tasks.get(self.task)
        if task.needs_init and not self.init:
            raise UserError(f"task {self.task!r} needs weights: pass --init RUN_DIR_OR_FILE "
                             "(or --init random for a baseline)")
        if task.check:
            task.check(self)
        for name in ("resolutions", "multigrid"):
            if getattr(self.train, name) and not task.multires:
                which = " or ".join(t.name for t in tasks.TASKS.values() if t.multires)
                raise UserError(f"train.{name} is for task {which}, not {self.task!r}; leave it empty "
                                f"(train.{name}=) for this task")
        if self.train.resolutions and self.train.multigrid:
            raise UserError("train.resolutions and train.multigrid both set the shape of each step; "
                            "use one of them")
        odd = [r for r in self.train.resolutions if r % self.model.patch_size]
        if odd:
            raise UserError(f"train.resolutions {odd} are not multiples of the patch size "
                            f"{self.model.patch_size}; use sides such as "
                            f"{','.join(str(self.model.patch_size * k) for k in (6, 8, 10))}")


# Per-command defaults (the CLI's when no --config is given, and the study's trials): each
# trains on built-in data in minutes on two CPU cores. --section.key=value overrides any of it.
# data.scale_min=0: crop by data, 0.8 on built-ins (8x8 digits: crop gently), real_scale_min on real data
BUILTIN = ["train.batch=64", "data.scale_min=0"]
RECIPES = {
    "train": ["task=supervised", *BUILTIN, "train.epochs=40", "train.base_lr=4e-3", "train.warmup_epochs=3"],
    "pretrain": ["task=mae", *BUILTIN, "data.real_scale_min=0.2", "train.epochs=60", "train.base_lr=4e-3",
                 "train.betas=0.9,0.95",
                 "train.warmup_epochs=5", "train.label_smoothing=0", "mae.decoder_width=64",
                 "mae.decoder_depth=2", "mae.decoder_heads=2", "mae.norm_pix_loss=auto",
                 "model.pos_embed=sincos"],
    "finetune": ["task=finetune", *BUILTIN, "train.epochs=20", "train.base_lr=4e-3", "train.layer_decay=0.75",
                 "train.warmup_epochs=2"],
    "distill": ["task=distill", *BUILTIN, "train.epochs=40", "train.base_lr=4e-3", "train.warmup_epochs=3"],
    "linprobe": ["task=linprobe", *BUILTIN, "train.epochs=30", "train.base_lr=0.4", "train.weight_decay=0",
                 "train.warmup_epochs=2", "train.label_smoothing=0"],
}


def recipe(command: str, **fields) -> RunConfig:
    """The default run config of a command ("train", "pretrain", "finetune", "linprobe", "distill")."""
    return apply_overrides(RunConfig(**fields), RECIPES[command])


def recipe_values(command: str) -> dict:
    """A command's recipe as typed nested values, not yet a RunConfig (finetune's needs the --init
    a later layer gives): the first layer of `layered`, and the defaults `--help` shows."""
    data = to_dict(RunConfig())
    for item in RECIPES[command]:
        set_item(data, item)
    return typed(RunConfig, data)


def command_for(task: str) -> str:
    """The command that runs `task` ("mae" -> "pretrain", "linprobe" -> "finetune --linear-probe"),
    or "" for a task no command runs."""
    name = next((c for c, items in RECIPES.items() if f"task={task}" in items), "")
    return "finetune --linear-probe" if name == "linprobe" else name


def layered(command: str, path: str | Path | None = None, model: str = "",
            changes: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config `vitscale COMMAND` runs with, in layers: the command's recipe (its task and
    defaults), then what the --config file at `path` names, then preset `model`, then `changes`
    (`key=value` strings: the flags). Checked once, at the end. A file for another task is refused,
    naming the command that runs it."""
    values = recipe_values(command)
    if path:
        given = read_config(path)
        task = given.get("task", values["task"])
        if task != values["task"] and not command_for(task):
            raise UserError(f"config file {str(path)!r} names task {shown(task)}, which no command runs; "
                            f"leave task out (`vitscale {command}` sets {values['task']})")
        if task != values["task"]:
            raise UserError(f"config file {str(path)!r} is for task {task}, not {values['task']}: run it "
                            f"with `vitscale {command_for(task)} --config {path}`")
        values = merge(values, given)
    if model:  # a preset's architecture; the position table stays, as in with_preset
        values["model"] = to_dict(preset(model, pos_embed=values["model"]["pos_embed"]))
    for item in changes:
        set_item(values, item)
    return from_dict(RunConfig, values)




def load_yaml(path: str | Path, cls=RunConfig):
    """Read a config YAML (a run config unless `cls` says; missing keys take their defaults)."""
    p = Path(path)
    data = read_mapping(p)
    try:
        return from_dict(cls, data)
    except UserError as e:
        raise UserError(f"config file {str(p)!r}: {e}") from None


def read_config(path: str | Path, cls=RunConfig) -> dict:
    """The typed values a --config file names: a layer over a command's defaults, not a config yet.

    A file naming `out` is refused: a run (a study) goes where --out says, or where its own
    config.yaml (study.yaml) lies. In that one place an `out` an older vitscale saved is ignored.
    """
    p = Path(path)
    data = dict(read_mapping(p))
    if "out" in data and home(p) is None:
        what = "run" if cls is RunConfig else "study"
        raise UserError(f"config file {str(p)!r} sets out: a config file does not say where a {what} goes; "
                        "remove the key and use --out DIR")
    data.pop("out", None)
    try:
        return typed(cls, data)
    except UserError as e:
        raise UserError(f"config file {str(p)!r}: {e}") from None


# What a run's (a study's) directory holds beside the config vitscale saved there.
_WORK = {RUN: (METRICS, FINAL, "ckpt-*"), STUDY: ("trials", "sweep")}


def home(path: str | Path) -> str | None:
    """The directory a run's config.yaml (a study's study.yaml) lies in when it holds that run's
    (study's) work: the run resumes there, wherever it was made. None for any other file."""
    p = Path(path)
    return str(p.parent) if any(any(p.parent.glob(m)) for m in _WORK.get(p.name, ())) else None


def with_preset(cfg: RunConfig, name: str) -> RunConfig:
    """Replace the model section by a preset's architecture; the config's position table stays
    (the pretrain recipe's fixed sin-cos)."""
    return replace(cfg, model=preset(name, pos_embed=cfg.model.pos_embed))


__all__ = ["DistillConfig", "RunConfig", "TrainConfig", "apply_overrides", "dump_yaml", "from_dict",
           "layered", "load_yaml", "read_config", "to_dict", "with_preset"]
