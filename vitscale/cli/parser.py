"""The `vitscale` argument parser: one small function per command adds its subparser, flags and
help; vitscale.cli.flags adds a flag per config field to the commands that train. Each subparser
names its function in vitscale.cli.commands (`run`)."""

from __future__ import annotations

import argparse
import math
from importlib import metadata

from vitscale.cli import commands, flags
from vitscale.common.device import DEVICES, DTYPES, check_device
from vitscale.common.errors import UserError

DESCRIPTION = "The `vitscale` command line: parses arguments and calls the library."
USAGE = "%(prog)s [options] [--SECTION.KEY VALUE ...]"


class _Parser(argparse.ArgumentParser):
    """Flags are checked like any user input: a bad one ends in one line and exit 2; no flag
    takes an empty string (`--out ''` is a mistake, never a way to ask for the default)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action", "store") in ("store", "append") and "type" not in kwargs:
            kwargs["type"] = _text
        return super().add_argument(*args, **kwargs)


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value; give one or leave the flag out")
    return text


def _device(text: str) -> str:
    try:
        return check_device(text)
    except UserError:
        raise argparse.ArgumentTypeError(f"must be {DEVICES}, got {text[:40]!r}") from None


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, got {text[:40]!r}")
    return int(text)


def _image_size(text: str) -> int | tuple[int, int]:
    """'224' -> 224, '224x160' -> (224, 160)."""
    parts = text.lower().split("x")
    if not all(p.isdigit() for p in parts) or len(parts) > 2:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text[:60]!r}")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model preset and the input it is costed at (models, cost, scale, bench)."""
    p.add_argument("model", help="preset SIZE/PATCH[-fFRAMES[tTUBELET]], e.g. B/16, S/16-f16")
    p.add_argument("--image-size", type=_image_size, help="input size N or HxW in pixels")
    p.add_argument("--frames", type=int, help="input frames (video)")
    p.add_argument("--tubelet", type=int, help="frames per token (video)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (0 = no head)")


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), as pip and importlib.metadata see it."""
    try:
        return metadata.version("vitscale")
    except metadata.PackageNotFoundError:
        return "(not installed: pip install -e .)"


def build_parser(fields_for: str = "") -> argparse.ArgumentParser:
    """The parser; the subcommand `fields_for` ("train", "study", "config study", ...) also gets a
    flag per config field (they import the configs, which the other commands need not wait for)."""
    parser = _Parser(prog="vitscale", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show a bug's traceback instead of saving it")
    parser.add_argument("--version", action="version", version=f"vitscale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_cost, _add_scale, _add_bench):
        add(sub)
    for name, text in RUN_COMMANDS:
        _add_run_command(sub, name, text, with_fields=name == fields_for)
    _add_study(sub, with_fields=fields_for == "study")
    _add_config(sub, with_fields=fields_for == "config study")
    for add in (_add_convert, _add_eval, _add_predict, _add_soup, _add_export):
        add(sub)
    return parser


def _add_models(sub) -> None:
    """`vitscale models`: every preset's cost."""
    p = sub.add_parser("models", help="list presets with params, GFLOPs (multiply-adds) and acts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=commands.cmd_models)


def _add_cost(sub) -> None:
    """`vitscale cost MODEL`: one config's cost."""
    p = sub.add_parser("cost", help="params, GFLOPs (multiply-adds) and acts of one config")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_cost)


def _add_scale(sub) -> None:
    """`vitscale scale MODEL --strategy S --factors F`: a scaled family."""
    p = sub.add_parser("scale", help="scale a model by strategies to flops factors")
    _add_model_args(p)
    p.add_argument("--strategy", default="d1_w8_r1",
                   help="comma-separated strategies: d, w, r, t, dw, dwr, d1_w8_r1, ...")
    p.add_argument("--factors", type=_floats, default=[1.0, 2.0, 4.0, 8.0],
                   help="flops factors, e.g. 1,2,4,8")
    p.add_argument("--measure", action="store_true",
                   help="also time a training step of each scaled model and correlate runtime")
    p.add_argument("--batch", type=int, default=32, help="batch for --measure")
    p.add_argument("--iters", type=int, default=3, help="timed steps for --measure")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_scale)


def _add_bench(sub) -> None:
    """`vitscale bench MODEL`: measured throughput, latency and memory."""
    p = sub.add_parser("bench", help="measure throughput, latency and peak memory")
    _add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", default="both", choices=["infer", "train", "both"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing of every block "
                   "(train.act_ckpt): less peak memory in training for about one more forward pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile); the "
                   "warm-up steps absorb the compilation, their seconds are shown apart (warmup_s)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak for --dtype, "
                   "for MFU (0 = vitscale.cost.mfu's table for known GPUs; none on a CPU unless given)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_bench)


# the commands that train one run (commands.cmd_train), with their help
RUN_COMMANDS = (("train", "supervised training from scratch"),
                ("pretrain", "MAE / VideoMAE masked pre-training"),
                ("finetune", "fine-tune (or --linear-probe) a pre-trained encoder"),
                ("distill", "train a student taught by a frozen teacher (logits, or features)"))
# --init's help where a command gives it a meaning of its own
INIT_HELP = {
    "finetune": "weights: a run directory, a transformers model directory, a timm / MAE / VideoMAE "
                ".safetensors or .pth file, or 'random' (a baseline); required unless the --config names one",
    "distill": "start the student from weights, e.g. a --distill.kind=feature run (G2SD's specific stage "
               "after its generic one)",
}
INIT_HELP_ANY = ("start from these weights (a run directory, a transformers directory, a timm / MAE / "
                 "VideoMAE / vitscale file) instead of at random")


def _add_run_command(sub, name: str, text: str, with_fields: bool) -> None:
    """`vitscale train|pretrain|finetune|distill`: one run; `with_fields`: a flag per run-config field."""
    linprobe = " --linear-probe has defaults of its own (`vitscale config linprobe`)."
    p = sub.add_parser(name, help=text, allow_abbrev=False, usage=USAGE,
                       description=f"{text}. The command sets the task and its recipe's defaults "
                       "(shown below); a --config file sets what it names over them, and flags set what "
                       "they name over both: --section.key=value or --section.key value. "
                       f"`vitscale config {name}` prints the resolved config."
                       + (linprobe if name == "finetune" else ""))
    p.add_argument("--config", metavar="FILE", help="a run config YAML: the keys it names over the "
                   "recipe's (a run's own config.yaml resumes that run; with --out DIR, repeats it)")
    p.add_argument("--model", metavar="PRESET", help="model preset, e.g. pico/4, mu/4, pico/4-f8")
    p.add_argument("--out", help="run directory: a new or empty folder, or this run's (it resumes)")
    if name == "distill":
        p.add_argument("--teacher", help="the frozen teacher: a run directory, a transformers model "
                       "directory, or a timm / MAE / VideoMAE / vitscale weights file (distill.teacher); "
                       "--distill.kind=soft|hard|feature, --distill.alpha, --distill.temperature")
    p.add_argument("--init", help=INIT_HELP.get(name, INIT_HELP_ANY))
    if name == "finetune":
        p.add_argument("--linear-probe", action="store_true",
                       help="freeze the encoder and train a linear head")
    p.add_argument("--init-allow", action="append", metavar="PATTERN",
                   help="a key pattern (fnmatch) the --init weights may leave missing or unused; repeatable")
    if with_fields:
        # local: a slow import that only this command's field flags need (keeps `vitscale models` quick)
        from vitscale.train import config

        flags.add_run_fields(p, config.RunConfig, config.recipe_values(name))
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_train)


def _add_study(sub, with_fields: bool) -> None:
    """`vitscale study`: the scaling study; `with_fields`: a flag per study field."""
    p = sub.add_parser("study", help="the scaling study: train a scaled family, fit, report, recommend",
                       allow_abbrev=False, usage=USAGE,
                       description="Scale a base model by each strategy and factor, train every trial under "
                       "the same budget, fit what was measured, and recommend a model. Finished trials are "
                       "never re-run; an interrupted study continues. Any run-config field can be set for "
                       "every trial with --section.key=value. `vitscale config study` lists every study "
                       "field with its default and help (`vitscale config train` / `pretrain`: the trials').")
    p.add_argument("--config", help="a study YAML: its keys over the defaults (runs/study/study.yaml "
                   "continues that study)")
    p.add_argument("--trial", help="run only this trial, every seed (e.g. one torchrun job per trial on a "
                   "cluster), or 'sweep': only the learning-rate sweep, which the trials need first")
    p.add_argument("--plan", action="store_true", help="print the trials, phases and estimated compute; "
                   "trains nothing, writes nothing")
    p.add_argument("--collect", action="store_true", help="only analyse and report the trials that have "
                   "finished (the others are listed as missing); trains nothing")
    if with_fields:
        _add_study_fields(p, leave_out=("overrides",))
    p.add_argument("--json", action="store_true", help="print summary.json (with --plan: the plan)")
    p.set_defaults(run=commands.cmd_study)


def _add_config(sub, with_fields: bool) -> None:
    """`vitscale config COMMAND`: the config COMMAND runs with; `with_fields`: the study's fields."""
    names = commands.CONFIG_COMMANDS
    p = sub.add_parser("config", help="a command's resolved config: every field, its default and its help",
                       description="Print the config COMMAND runs with (its recipe, then --config, --model, "
                       "--init, --teacher and --section.key=value as that command takes them) as YAML, each "
                       "field's help beside it. The output is a --config file.")
    p.add_argument("of", metavar="COMMAND", choices=names, help=", ".join(names))
    p.add_argument("--config", help="a run (study) config YAML: its keys over the recipe's (the study's "
                   "defaults)")
    p.add_argument("--model", help="model preset (study: the base preset)")
    p.add_argument("--out", help="run (study) directory")
    p.add_argument("--init", help="finetune / linprobe / distill: the weights to start from")
    p.add_argument("--teacher", help="distill: the frozen teacher")
    p.add_argument("--json", action="store_true", help='print {"config": ..., "help": {dotted key: help}}')
    p.set_defaults(run=commands.cmd_config, fields={})
    if with_fields:
        _add_study_fields(p, leave_out=("overrides", "model", "out"))


def _add_study_fields(p: argparse.ArgumentParser, leave_out: tuple[str, ...]) -> None:
    """A flag per study field but those in `leave_out`."""
    # local: a slow import that only the study's field flags need (keeps `vitscale models` quick)
    from vitscale.study.config import StudyConfig

    flags.add_study_fields(p, StudyConfig, leave_out=leave_out)


def _add_convert(sub) -> None:
    """`vitscale convert SRC OUT --to FORMAT`: weights between formats."""
    p = sub.add_parser("convert", help="convert weights: transformers, timm, MAE, VideoMAE, vitscale",
                       description="Read weights in any format vitscale knows, build and check the model, "
                       "and write it in another. Prints what was loaded, resampled and left out.")
    p.add_argument("src", help="a transformers directory, a timm / MAE / VideoMAE / vitscale file, or a run")
    p.add_argument("out", help="output directory (hf, vitscale) or .safetensors file (timm)")
    p.add_argument("--to", required=True, choices=["hf", "timm", "vitscale"], help="output format")
    p.add_argument("--model", help="a preset lending the heads and input size a state dict does not record")
    p.add_argument("--heads", type=int, help="attention heads (state dicts do not record them)")
    p.add_argument("--decoder-heads", type=int, help="MAE decoder attention heads")
    p.add_argument("--image-size", type=_image_size, help="resample to this input size, N or HxW")
    p.add_argument("--frames", type=int, help="resample to this frame count (video)")
    p.add_argument("--num-classes", type=int, help="a new class head of this size (the old one is left out)")
    p.add_argument("--drop-head", action="store_true", help="leave the class head out")
    p.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                   help="a key pattern (fnmatch) that may be missing, unused or reshaped; repeatable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_convert)


def _add_eval(sub) -> None:
    """`vitscale eval RUN`: a run's best checkpoint, scored."""
    p = sub.add_parser("eval", help="evaluate a run's best checkpoint on its validation and test data")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--test-views", default=None, metavar="CLIPSxCROPS",
                   help="score the test split over these views, e.g. 5x3 (default: data.test_views)")
    p.add_argument("--resolution", type=int, default=0, metavar="PIXELS",
                   help="feed the data at this side instead of the trained one (a multiple of the patch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_eval)


def _add_predict(sub) -> None:
    """`vitscale predict RUN FILE...`: classify files."""
    p = sub.add_parser("predict", help="classify image and video files with a trained run",
                       description="The most probable classes of each file (a folder: its images and "
                       "videos), with their probabilities, by the run's best checkpoint through its own "
                       "evaluation transforms (size, crop, normalisation, frames). An unreadable file is "
                       "named on stderr and skipped.")
    p.add_argument("run_dir", help="run directory (train, finetune, linprobe or distill)")
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR", help="image or video files, or folders of them")
    p.add_argument("--top-k", type=_positive, default=5, help="classes shown per file (default 5)")
    p.add_argument("--batch", type=_positive, default=32, help="files per forward pass (default 32)")
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (train.ema) instead")
    p.add_argument("--json", action="store_true", help="print a JSON list of {file, top: [{class, id, "
                   "probability}]}")
    p.set_defaults(run=commands.cmd_predict)


def _add_soup(sub) -> None:
    """`vitscale soup RUN RUN... --out DIR`: average fine-tuned runs."""
    p = sub.add_parser("soup", help="average fine-tuned runs of one model and initialisation (model soups)",
                       description="Average the weights of runs fine-tuned from one initialisation "
                       "(Wortsman et al. 2022): the uniform soup, and with --greedy the greedy one. Chosen "
                       "on the validation split, reported on the test split; the soup saved is a run.")
    p.add_argument("runs", nargs="+",
                   help="run directories (their best/ checkpoints; EMA weights where kept)")
    p.add_argument("--out", required=True, help="output run directory, new or empty (soup.json, config.yaml, "
                   "best/)")
    p.add_argument("--greedy", action="store_true",
                   help="also cook the greedy soup (add ingredients best first while val does not fall) "
                   "and save it instead of the uniform one")
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print soup.json")
    p.set_defaults(run=commands.cmd_soup)


def _add_export(sub) -> None:
    """`vitscale export RUN --to onnx`: the model as an ONNX graph."""
    p = sub.add_parser("export", help="the model a run trained as an ONNX graph, checked with onnxruntime",
                       description="Export a run's best checkpoint for inference: a classifier's logits, "
                       "or an MAE's pooled encoder features, at the run's input size; kept only once "
                       "onnxruntime matches PyTorch on random inputs. Needs pip install 'vitscale[onnx]'.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--to", required=True, choices=["onnx"], help="output format")
    p.add_argument("--out", help="output .onnx file (default RUN/model.onnx; an existing one is refused); "
                   "FILE.json beside it says the input's shape and normalisation")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (any batch, the default) or a fixed batch N")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (train.ema) instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.cmd_export)
