"""`vitscale export RUN --to onnx`: the model a run trained as an ONNX graph for inference,
kept only once onnxruntime gives the PyTorch model's outputs on random inputs.

What the graph computes is what `vitscale eval` scores (the task's `predict`), on the run's
best checkpoint (else its newest whole one):
  supervised, finetune, linprobe, distill (logits)   x -> logits [B, classes]
  mae, distill (feature)                             x -> the encoder's pooled, normalised
                                                     feature [B, D] (what the run's k-NN scores)
x is [B, C, H, W] (images) or [B, C, T, H, W] (video) at the run's own input size, normalised as
its data were (data.norm, written beside the graph with the class names: FILE.onnx.json); B is
any batch ("dynamic") or a fixed one.

The exporter is torch.onnx's (torch.export, "dynamo"), which needs onnxscript; the check needs
onnxruntime: `pip install 'vitscale[onnx]'`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vitscale import tasks
from vitscale.common import classnames, io
from vitscale.common.errors import UserError, optional
from vitscale.common.rundir import RUN
from vitscale.train.config import RunConfig
from vitscale.train.rundir import Run, RunDir

logger = logging.getLogger(__name__)

FORMATS = ("onnx",)
OPSET = 18  # the opset torch.onnx's dynamo exporter targets natively
CHECK_BATCHES = (1, 3)  # batches a dynamic graph is checked at
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted, relative to max(1, the outputs' largest |value|)
LARGE = 1.5 * 2**30  # bytes of weights beyond which they go to a .data file by the graph (protobuf: 2 GB)


@dataclass(frozen=True)
class Exported:
    path: Path  # the graph written
    files: tuple[Path, ...]  # everything written: the graph, its weights file if apart, its .json
    checkpoint: Path  # the checkpoint exported
    output: str  # "logits" or "features"
    input_shape: tuple[int | str, ...]  # "batch" where the batch is dynamic
    output_shape: tuple[int | str, ...]
    max_diff: dict[int, float]  # batch -> max |onnxruntime - PyTorch|

    def summary(self) -> str:
        diffs = ", ".join(f"{d:.2g} at batch {b}" for b, d in self.max_diff.items())
        return (f"wrote {', '.join(map(str, self.files))}: x {_shape(self.input_shape)} -> {self.output} "
                f"{_shape(self.output_shape)} (opset {OPSET}, from {self.checkpoint}); onnxruntime vs "
                f"PyTorch max abs difference {diffs}")


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class Predictor(nn.Module):
    """A task module's `predict` as a module's forward (what the exporter traces)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module.predict(x)


def predictor(run: str, ema: bool = False) -> tuple[Predictor, Run, int]:
    """The eval-mode model of a run's best checkpoint (else its newest whole one) on the CPU:
    (model, the run opened, its class logits: 0 where it gives features). `ema` takes the
    checkpoint's moving average (train.ema) instead of its raw weights."""
    opened = RunDir(run).open()
    cfg, ckpt, state = opened.config, opened.checkpoint.path, opened.checkpoint.model
    if ema:
        if opened.checkpoint.ema is None:
            raise UserError(f"--ema: {ckpt} holds no EMA weights (the run did not set train.ema); "
                             "leave --ema out")
        state = opened.checkpoint.ema
    if tasks.get(cfg.task).student:  # the student alone: its teacher only taught it
        state = {k: v for k, v in state.items() if k.startswith("vit.")}
        head = state.get("vit.head.weight")
        module = tasks.Classifier(cfg.model.replace(num_classes=0 if head is None else head.shape[0]))
    else:
        head = state.get("vit.head.weight", state.get("head.weight"))
        module = tasks.build(cfg, 0 if head is None else head.shape[0])
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"{ckpt} does not fit {opened.dir.config_file} ({first.strip()[:160]}); put "
                         f"back the run's own {RUN}") from None
    return Predictor(module).eval(), opened, 0 if head is None else head.shape[0]


def class_names(run: Run, logits: int) -> tuple[tuple[str, ...], bool]:
    """(the name of each of a model's `logits` classes, whether the run saved them): its data's
    classes; ((), True) for a model that gives features."""
    if not logits:
        return (), True
    if len(run.classes) != logits:
        raise UserError(f"{run.checkpoint.path} gives {logits} classes, {run.dir.config_file} says "
                        f"{len(run.classes)}; put back the run's own {RUN}")
    return run.classes, run.named


def input_shape(cfg: RunConfig, batch: int) -> tuple[int, ...]:
    """The run's model input at `batch`: [B, C, H, W] or [B, C, T, H, W]."""
    m = cfg.model
    return (batch, m.in_chans, *((m.frames,) if m.is_video else ()), *m.hw)


def parse_batch(text: str) -> int | None:
    """'dynamic' -> None (any batch); 'N' -> N."""
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch must be 'dynamic' or a positive whole number, got {text[:40]!r}")
    return int(text)


@contextmanager
def _quiet():
    """torch.onnx's progress lines and notes (e.g. torchvision ops it skips) off the console."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export(run: str, to: str = "onnx", out: str | None = None, batch: str = "dynamic",
           ema: bool = False) -> Exported:
    """Export a run's model (see the module docstring) to `out` (default RUN/model.onnx), check
    it with onnxruntime on random inputs, and only then publish it; an existing output is
    refused, never overwritten."""
    if to not in FORMATS:
        raise UserError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    fixed = parse_batch(batch)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        optional(module, "onnx", "exporting to ONNX")
    model, opened, classes = predictor(run, ema)
    cfg, ckpt, logits = opened.config, opened.checkpoint.path, classes > 0
    names, named = class_names(opened, classes)
    if not named:
        logger.warning(classnames.missing(run, classes))
    path = Path(out) if out else Path(run) / "model.onnx"
    if path.suffix != ".onnx":
        raise UserError(f"--out {str(path)!r} must end in .onnx")
    sidecar = path.with_name(path.name + ".json")
    for p in (path, path.with_name(path.name + ".data"), sidecar):
        if p.exists():
            raise UserError(f"{p} exists; remove it or pass another --out")
    if not path.parent.is_dir():
        raise UserError(f"--out {str(path)!r}: no directory {str(path.parent)!r}")
    example = torch.randn(input_shape(cfg, fixed or 2))
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > LARGE
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        dynamic = None if fixed else ({0: torch.export.Dim("batch", min=1)},)
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (example,), str(staged), input_names=["x"],
                              output_names=["logits" if logits else "features"], dynamic_shapes=dynamic,
                              opset_version=OPSET, dynamo=True, external_data=large, verbose=False)
        diffs, out_shape = check(staged, model, cfg, (fixed,) if fixed else CHECK_BATCHES)
        files = sorted(Path(tmp).iterdir())
        for f in files:  # the graph, and its weights where apart (named in the graph: same names)
            os.replace(f, path.parent / f.name)
        io.fsync(path.parent)
    written = tuple(path.parent / f.name for f in files)
    batch_dim = fixed or "batch"
    result = Exported(path, (*written, sidecar), ckpt, "logits" if logits else "features",
                      (batch_dim, *input_shape(cfg, 1)[1:]), (batch_dim, out_shape[1]), diffs)
    mean, std = cfg.data.norm
    io.atomic_write_text(sidecar, json.dumps({
        "run": str(run), "checkpoint": str(ckpt), "task": cfg.task, "ema": ema, "opset": OPSET,
        "input": {"name": "x", "shape": list(result.input_shape),
                  "layout": "BCTHW" if cfg.model.is_video else "BCHW",
                  "pixels": "RGB in [0, 1], then (x - mean) / std per channel", "mean": mean, "std": std},
        "output": {"name": result.output, "shape": list(result.output_shape)},
        "classes": list(names) if logits else None,  # the name of each logit, in class-id order
        "max_abs_diff": {str(b): d for b, d in diffs.items()},
    }, indent=2) + "\n")
    return result


def check(path: Path, model: nn.Module, cfg: RunConfig, batches: tuple[int, ...]
          ) -> tuple[dict[int, float], tuple[int, ...]]:
    """Run the graph with onnxruntime on standard-normal inputs at each batch against the PyTorch
    model: (batch -> max abs difference, the output shape). A difference beyond TOLERANCE is a
    bug of the exporter or of vitscale, not the user's: RuntimeError, and nothing is kept."""
    ort = optional("onnxruntime", "onnx", "exporting to ONNX")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    diffs, shape = {}, ()
    for b in batches:
        x = torch.randn(input_shape(cfg, b), generator=generator)
        with torch.no_grad():
            want = model(x).float()
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        if got.shape != want.shape:
            raise RuntimeError(f"onnxruntime gave {tuple(got.shape)} at batch {b}, "
                               f"PyTorch {tuple(want.shape)}")
        diffs[b], shape = float((got - want).abs().max()), tuple(want.shape)
        if not diffs[b] <= TOLERANCE * max(1.0, float(want.abs().max())):
            raise RuntimeError(f"onnxruntime's outputs differ from PyTorch's by up to {diffs[b]:.3g} "
                               f"at batch {b} (tolerance {TOLERANCE:g}); the graph was not kept")
    return diffs, shape
