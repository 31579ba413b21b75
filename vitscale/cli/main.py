"""The `vitscale` command line: parses arguments and calls the library.

    vitscale models                          presets with params, GFLOPs, acts
    vitscale cost B/16 --image-size 384      cost of one config
    vitscale scale S/16 --strategy d,w,d1_w8_r1 --factors 1,2,4,8 [--measure]
    vitscale bench S/16 --batch 32 --dtype bf16
    vitscale train [--config FILE.yaml] [--model PRESET] [--out DIR] [--section.key=value ...]
    vitscale pretrain / finetune --init RUN_DIR [--linear-probe] / eval RUN_DIR
    vitscale distill --teacher RUN_DIR --model pico/4  a student taught by a frozen teacher
    vitscale convert SRC --to hf|timm|vitscale OUT    weights between formats
    vitscale soup RUN RUN ... --out DIR [--greedy]  average fine-tuned runs (model soups)
    vitscale config pretrain [--json]        a command's resolved config, every field with its help
    vitscale export RUN --to onnx [--out FILE] [--batch dynamic|N]  the run's model as an ONNX graph
    vitscale predict RUN FILE_OR_DIR... [--top-k 5] [--json]  classify files with a trained run

User errors (unknown preset, bad strategy, a size the patch does not divide) end in one
line on stderr and exit code 2; a training stopped by a non-finite loss exits 3, one stopped
by a signal (after a checkpoint) 4; anything else is a bug: one line naming the file that
holds its traceback, exit 1 (`vitscale --debug ...` shows it instead).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from vitscale.cli import tables
from vitscale.common import errors
from vitscale.common.device import DEVICES, DTYPES, check_device
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides, from_dict, merge
from vitscale.common.stats import pearson
from vitscale.cost import counted, mfu, scaling
from vitscale.cost import measure as bench
from vitscale.cost.complexity import cost
from vitscale.models.presets import preset, preset_names
from vitscale.models.vit import ViTConfig


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
    p.add_argument("model", help="preset SIZE/PATCH[-fFRAMES[tTUBELET]], e.g. B/16, S/16-f16")
    p.add_argument("--image-size", type=_image_size, help="input size N or HxW in pixels")
    p.add_argument("--frames", type=int, help="input frames (video)")
    p.add_argument("--tubelet", type=int, help="frames per token (video)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (0 = no head)")


def _config(args: argparse.Namespace) -> ViTConfig:
    fields = ("image_size", "frames", "tubelet", "num_classes")
    return preset(args.model, **{f: getattr(args, f) for f in fields if getattr(args, f) is not None})


def cmd_models(args: argparse.Namespace) -> None:
    records = []
    for name in preset_names():
        cfg = preset(name)
        records.append({"name": name} | tables.cost_record(cfg, cost(cfg)))
    if args.json:
        return tables.print_json(records)
    keys = ["name", "depth", "width", "heads", "patch", "image_size", "frames", "tokens",
            "params", "flops", "acts"]
    tables.console().print(tables.table("Presets (GFLOPs are multiply-adds per sample)", records, keys))


def cmd_cost(args: argparse.Namespace) -> None:
    cfg = _config(args)
    record = {"name": args.model} | tables.cost_record(cfg, cost(cfg))
    if args.json:
        return tables.print_json(record)
    keys = ["name", "depth", "width", "heads", "patch", "image_size", "frames", "tokens",
            "params", "flops", "acts"]
    tables.console().print(tables.table("Cost (GFLOPs are multiply-adds per sample)", [record], keys))


def cmd_scale(args: argparse.Namespace) -> None:
    base = _config(args)
    strategies = args.strategy.split(",")
    for s in strategies:  # fail on any bad string before doing work
        scaling.parse_strategy(s)
    records, configs, exponents = [], [], {}
    for s in strategies:
        family = scaling.scale_family(base, s, args.factors)
        if len({m.cost.flops for m in family}) > 1:
            exponents[s] = scaling.growth_exponent(family)
        for m in family:
            configs.append(m.config)
            records.append({"strategy": s, "target": m.target, "achieved": m.achieved}
                           | tables.cost_record(m.config, m.cost))
    if args.measure:
        _measure_family(records, configs, args)
    if args.json:
        return tables.print_json({"base": args.model, "records": records, "acts_exponent": exponents})
    out = tables.console()
    keys = ["strategy", "target", "achieved", "depth", "width", "heads", "image_size", "frames",
            "params", "flops", "acts"] + (["samples_per_s"] if args.measure else [])
    out.print(tables.table(f"Scaling {args.model} (GFLOPs are multiply-adds per sample)", records, keys))
    for s, e in exponents.items():
        out.print(f"acts growth exponent vs flops, {s}: {e:.2f}")
    if args.measure:
        out.print(_correlation_line(records))


def _measure_family(records: list[dict], configs: list[ViTConfig], args: argparse.Namespace) -> None:
    """Add measured training throughput to every record (each distinct config timed once)."""
    seen: dict[ViTConfig, bench.Measurement] = {}
    for r, cfg in zip(records, configs, strict=True):
        if cfg not in seen:
            seen[cfg] = bench.measure(cfg, batch=args.batch, mode="train", dtype=args.dtype,
                                      device=args.device, warmup=1, iters=args.iters)
        r["samples_per_s"] = seen[cfg].samples_per_s
        r["s_per_sample"] = 1.0 / seen[cfg].samples_per_s


def _correlation_line(records: list[dict]) -> str:
    """Pearson r of measured time per sample with flops, params and acts."""
    times = [r["s_per_sample"] for r in records]
    rs = {k: pearson([r[k] for r in records], times) for k in ("flops", "params", "acts")}
    return "runtime correlation (Pearson r, time per sample): " + ", ".join(
        f"{k} {v:.3f}" for k, v in rs.items())


def cmd_bench(args: argparse.Namespace) -> None:
    cfg = _config(args)
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    c = cost(cfg)
    records = []
    for mode in modes:
        m = bench.measure(cfg, batch=args.batch, mode=mode, dtype=args.dtype, device=args.device,
                          warmup=args.warmup, iters=args.iters, act_ckpt=args.act_ckpt, compile=args.compile)
        peak = mfu.peak_tflops(m.device, args.dtype, args.peak_tflops)
        records.append({"name": args.model} | m.as_dict() | {"act_ckpt": args.act_ckpt, "params": c.params,
                                                             "compile": args.compile,
                                                             "flops": c.flops, "peak_tflops": peak,
                       "mfu": mfu.mfu(m.samples_per_s, counted.macs_per_sample(cfg, mode), peak)})
    if args.json:
        return tables.print_json(records)
    keys = ["name", "mode", "dtype", "batch", "samples_per_s", "ms_per_step", "peak_mem_mb",
            "params", "flops"] + (["act_ckpt"] if args.act_ckpt else []) + (
        ["warmup_s"] if args.compile else []) + (
        ["mfu"] if records[0]["mfu"] is not None else [])
    how = ", torch.compile'd (warm-up: compiling)" if args.compile else ""
    tables.console().print(tables.table(f"Measured on {records[0]['device']}{how}", records, keys))
    if args.act_ckpt and "train" in modes:
        plain, ckpt = (bench.held(cfg, args.batch, args.dtype, args.device, act_ckpt=c) / 2**20
                       for c in (False, True))
        print(f"activations held for backward ({args.batch} samples, {args.dtype}): {plain:.1f} MB plain, "
              f"{ckpt:.1f} MB with every block checkpointed ({plain / max(ckpt, 1e-9):.1f}x less)")


def _run_config(args: argparse.Namespace, extra: list[str]):
    """The command's recipe, then --config, then --model, --init, --teacher, --out (else the run
    directory a run's own config.yaml lies in) and --section.key=value (config.layered)."""
    from vitscale.train import config

    command = "linprobe" if getattr(args, "linear_probe", False) else args.command
    init, teacher = getattr(args, "init", None), getattr(args, "teacher", None)
    out = args.out or (config.home(args.config) if args.config else None)
    changes = ([f"out={out}"] if out else []) + ([f"init={init}"] if init else [])
    changes += [f"init_allow={','.join(args.init_allow)}"] if getattr(args, "init_allow", None) else []
    changes += [f"distill.teacher={teacher}"] if teacher else []
    unknown = [e for e in extra if e.startswith("--") and "." not in e.split("=")[0]]
    if unknown:
        raise UserError(f"unrecognised arguments: {' '.join(unknown)} "
                         "(overrides look like --train.epochs=5)")
    changes += getattr(args, "overrides", []) + _pairs(extra)
    cfg = config.layered(command, args.config, args.model or "", changes)
    if not cfg.out.strip():
        raise UserError("out (the run directory) is empty; set --out DIR")
    return cfg


def _pairs(extra: list[str]) -> list[str]:
    """Accept both --a.b=v and --a.b v."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if "=" not in item and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            item, i = f"{item}={extra[i + 1]}", i + 1
        out.append(item)
        i += 1
    return out


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from vitscale.common import dist
    from vitscale.train import engine

    cfg = _run_config(args, extra)
    d = dist.setup(cfg.train.device)
    try:
        result = engine.train(cfg, d=d).metrics
    finally:
        dist.teardown(d)
    if not d.main:
        return
    print(json.dumps(result) if args.json else
          f"done: {', '.join(f'{k} {v:.4g}' for k, v in result.items())}; results in {cfg.out}")


def _study_config(path: str | None, given: dict, extra: list[str]):
    """StudyConfig's defaults, then the --config file at `path`, then the flags' fields `given`
    ({field: text}); the trial overrides in `extra` (--section.key=value) go after the file's.
    All checked (the trials' run config too) before any work."""
    from dataclasses import replace

    from vitscale.study.config import StudyConfig, base_run
    from vitscale.train import config

    overrides = _pairs(extra)
    bad = [o for o in overrides if not o.startswith("--") or "." not in o.split("=")[0]]
    if bad:
        raise UserError(f"unrecognised arguments: {' '.join(bad)} "
                         "(trial overrides look like --train.base_lr=2e-3)")
    out = given.get("out") or (config.home(path) if path else None)
    values = config.read_config(path, StudyConfig) if path else {}
    cfg = from_dict(StudyConfig, merge(values, given | ({"out": out} if out else {})))
    cfg = replace(cfg, overrides=cfg.overrides + tuple(o.lstrip("-") for o in overrides))
    apply_overrides(base_run(cfg), list(cfg.overrides))
    return cfg


def cmd_study(args: argparse.Namespace, extra: list[str]) -> None:
    from vitscale.study import runner

    cfg = _study_config(args.config, args.fields, extra)

    def to_stderr(message: str) -> None:  # with --json, stdout carries the summary alone
        print(message, file=sys.stderr)

    if args.plan or args.collect:
        from vitscale.study import preview

        if args.trial or (args.plan and args.collect):
            raise UserError("--plan and --collect work on the whole study; give one, without --trial")
        if args.plan:
            plan = preview.describe(cfg)
            return tables.print_json(plan) if args.json else print("\n".join(preview.lines(plan)))
        summary = preview.collect(cfg, log=to_stderr if args.json else print)
    else:
        summary = runner.run_study(cfg, only=args.trial, log=to_stderr if args.json else print)
    if summary is None:
        return
    if args.json:
        from vitscale.study.summary import as_json

        print(as_json(summary))
        return
    bt, rec = summary.backtest, summary.recommendation
    if bt.checks:
        print(f"backtest: the law, fitted without {', '.join(bt.held_out)}, predicts them within "
              f"{100 * bt.mean_abs_error:.1f} points on average (max {100 * bt.max_abs_error:.1f}); "
              f"its intervals cover {bt.covered} of {len(bt.checks)}")
    if rec.pick:
        p = rec.pick
        print(f"recommended for {rec.budget}: {p.strategy} at {p.factor:.3g}x the base's flops (depth "
              f"{p.model.depth}, width {p.model.width}), {p.steps} steps, predicted {summary.metric} "
              f"{100 * p.accuracy:.1f}% ({100 * p.interval[0]:.1f}-{100 * p.interval[1]:.1f})")
    m, best = rec.measured, rec.measured_best
    tie = (f"; within noise of it and cheaper: {m.name} at {m.steps} steps, {100 * m.accuracy:.1f}%"
           if m != best else "")
    print(f"best measured within the budget: {best.name} at {best.steps} steps, {100 * best.accuracy:.1f}%"
          f"{tie}; report in {cfg.out}/report.html")


CONFIG_COMMANDS = ("train", "pretrain", "finetune", "linprobe", "distill", "study")
PLACEHOLDERS = {"init": "RUN_DIR_OR_WEIGHTS", "teacher": "TEACHER_RUN_DIR_OR_WEIGHTS"}


def cmd_config(args: argparse.Namespace, extra: list[str]) -> None:
    """The config COMMAND would run with, as YAML with each field's help (a --config file)."""
    from vitscale.train import fieldhelp

    if args.of == "study":
        given = {k: v for k, v in (("model", args.model), ("out", args.out)) if v}
        cfg = _study_config(args.config, args.fields | given, extra)
    else:
        from vitscale.train import config

        given = config.read_config(args.config) if args.config else {}
        named = {"init": given.get("init"), "teacher": given.get("distill", {}).get("teacher")}
        missing = {"init": args.of in ("finetune", "linprobe"), "teacher": args.of == "distill"}
        for key in (k for k, needed in missing.items() if needed and not (named[k] or getattr(args, k))):
            setattr(args, key, PLACEHOLDERS[key])
            print(f"vitscale config: {key} shown as {PLACEHOLDERS[key]}; `vitscale {args.of}` needs "
                  f"--{key}", file=sys.stderr)
        cfg = _run_config(argparse.Namespace(**{**vars(args), "command": args.of}), extra)
    # the YAML is a --config file, and a config file does not say where a run goes
    print(fieldhelp.as_json(cfg) if args.json else
          fieldhelp.commented_yaml(cfg, leave_out=("out",)).rstrip("\n"))


def cmd_convert(args: argparse.Namespace) -> None:
    from vitscale import weights

    result, paths = weights.convert(
        args.src, args.to, args.out, model=args.model, heads=args.heads, decoder_heads=args.decoder_heads,
        image_size=args.image_size, frames=args.frames, num_classes=args.num_classes, head=not args.drop_head,
        allow=tuple(args.allow))
    if args.json:
        return tables.print_json(result.as_dict() | {"written": [str(p) for p in paths]})
    print(result.summary())
    print(f"wrote {', '.join(str(p) for p in paths)}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    from pathlib import Path

    from vitscale.common import classnames
    from vitscale.train import engine
    from vitscale.train.config import load_yaml

    result = engine.evaluate_run(args.run_dir, device=args.device, test_views=args.test_views or "",
                                 resolution=args.resolution)
    # the classes its metrics are over (the data's: an MAE's k-NN's too), by name
    count = load_yaml(Path(args.run_dir, "config.yaml")).model.num_classes
    names, named = classnames.read(Path(args.run_dir), count)
    if not named:
        print(f"note: {classnames.missing(args.run_dir, len(names))}", file=sys.stderr)
    if args.json:
        return print(json.dumps(result | {"classes": list(names)}))
    print(", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    print(f"classes ({len(names)}): {classnames.shown(names)}" if names else "no classes (unlabelled data)")


def cmd_predict(args: argparse.Namespace) -> None:
    from vitscale.common import classnames
    from vitscale.runs import predict

    run = predict.load_run(args.run_dir, ema=args.ema, device=args.device)
    found = predict.predict(run, args.files, top_k=args.top_k, batch=args.batch)
    if not run.named:
        print(f"note: {classnames.missing(args.run_dir, len(run.classes))}", file=sys.stderr)
    if args.json:
        return tables.print_json([p.as_dict() for p in found])
    for p in found:
        print(p.line(), flush=True)


def cmd_soup(args: argparse.Namespace) -> None:
    from vitscale.runs import soup

    result = soup.soup(args.runs, args.out, use_greedy=args.greedy, device=args.device,
                       log=lambda m: print(m, file=sys.stderr))
    if args.json:
        return tables.print_json(result)
    tables.console().print(soup.table(result))
    print(f"{soup.verdict(result)}; wrote {args.out}/soup.json and the {result['saved']} soup as a run "
          f"({args.out}/best)")


def cmd_export(args: argparse.Namespace) -> None:
    from vitscale.runs import export

    result = export.export(args.run_dir, args.to, args.out, args.batch, ema=args.ema)
    print(json.dumps({"written": [str(p) for p in result.files], "max_abs_diff": result.max_diff})
          if args.json else result.summary())


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), as pip and importlib.metadata see it."""
    from importlib import metadata

    try:
        return metadata.version("vitscale")
    except metadata.PackageNotFoundError:
        return "(not installed: pip install -e .)"


USAGE = "%(prog)s [options] [--SECTION.KEY VALUE ...]"


def build_parser(fields_for: str = "") -> argparse.ArgumentParser:
    """The parser; the subcommand `fields_for` ("train", "study", "config study", ...) also gets a
    flag per config field (vitscale.cli.flags: they import the configs, which the other commands
    need not wait for)."""
    from vitscale.cli import flags as configflags

    parser = _Parser(prog="vitscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show a bug's traceback instead of saving it")
    parser.add_argument("--version", action="version", version=f"vitscale {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list presets with params, GFLOPs (multiply-adds) and acts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("cost", help="params, GFLOPs (multiply-adds) and acts of one config")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_cost)

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
    p.set_defaults(run=cmd_scale)

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
    p.set_defaults(run=cmd_bench)

    for name, text in [("train", "supervised training from scratch"),
                       ("pretrain", "MAE / VideoMAE masked pre-training"),
                       ("finetune", "fine-tune (or --linear-probe) a pre-trained encoder"),
                       ("distill", "train a student taught by a frozen teacher (logits, or features)")]:
        p = sub.add_parser(name, help=text, allow_abbrev=False, usage=USAGE,
                           description=f"{text}. The command sets the task and its recipe's defaults "
                           "(shown below); a --config file sets what it names over them, and flags set what "
                           "they name over both: --section.key=value or --section.key value. "
                           f"`vitscale config {name}` prints the resolved config."
                           + (" --linear-probe has defaults of its own (`vitscale config linprobe`)."
                              if name == "finetune" else ""))
        p.add_argument("--config", metavar="FILE", help="a run config YAML: the keys it names over the "
                       "recipe's (a run's own config.yaml resumes that run; with --out DIR, repeats it)")
        p.add_argument("--model", metavar="PRESET", help="model preset, e.g. pico/4, mu/4, pico/4-f8")
        p.add_argument("--out", help="run directory: a new or empty folder, or this run's (it resumes)")
        if name == "finetune":
            p.add_argument("--init", help="weights: a run directory, a transformers model directory, a "
                           "timm / MAE / VideoMAE .safetensors or .pth file, or 'random' (a baseline); "
                           "required unless the --config names one")
            p.add_argument("--linear-probe", action="store_true",
                           help="freeze the encoder and train a linear head")
        elif name == "distill":
            p.add_argument("--teacher", help="the frozen teacher: a run directory, a transformers model "
                           "directory, or a timm / MAE / VideoMAE / vitscale weights file (distill.teacher); "
                           "--distill.kind=soft|hard|feature, --distill.alpha, --distill.temperature")
            p.add_argument("--init", help="start the student from weights, e.g. a --distill.kind=feature run "
                           "(G2SD's specific stage after its generic one)")
        else:
            p.add_argument("--init", help="start from these weights (a run directory, a transformers "
                           "directory, a timm / MAE / VideoMAE / vitscale file) instead of at random")
        p.add_argument("--init-allow", action="append", metavar="PATTERN",
                       help="a key pattern (fnmatch) the --init weights may leave missing or unused; "
                       "repeatable")
        if name == fields_for:
            from vitscale.train import config

            configflags.add_run_fields(p, config.RunConfig, config.recipe_values(name))
        p.add_argument("--json", action="store_true")
        p.set_defaults(run=cmd_train)

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
    if fields_for == "study":
        from vitscale.study.config import StudyConfig

        configflags.add_study_fields(p, StudyConfig, leave_out=("overrides",))
    p.add_argument("--json", action="store_true", help="print summary.json (with --plan: the plan)")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("config", help="a command's resolved config: every field, its default and its help",
                       description="Print the config COMMAND runs with (its recipe, then --config, --model, "
                       "--init, --teacher and --section.key=value as that command takes them) as YAML, each "
                       "field's help beside it. The output is a --config file.")
    p.add_argument("of", metavar="COMMAND", choices=CONFIG_COMMANDS, help=", ".join(CONFIG_COMMANDS))
    p.add_argument("--config", help="a run (study) config YAML: its keys over the recipe's (the study's "
                   "defaults)")
    p.add_argument("--model", help="model preset (study: the base preset)")
    p.add_argument("--out", help="run (study) directory")
    p.add_argument("--init", help="finetune / linprobe / distill: the weights to start from")
    p.add_argument("--teacher", help="distill: the frozen teacher")
    p.add_argument("--json", action="store_true", help='print {"config": ..., "help": {dotted key: help}}')
    p.set_defaults(run=cmd_config, fields={})
    if fields_for == "config study":
        from vitscale.study.config import StudyConfig

        configflags.add_study_fields(p, StudyConfig, leave_out=("overrides", "model", "out"))

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
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("eval", help="evaluate a run's best checkpoint on its validation and test data")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--test-views", default=None, metavar="CLIPSxCROPS",
                   help="score the test split over these views, e.g. 5x3 (default: data.test_views)")
    p.add_argument("--resolution", type=int, default=0, metavar="PIXELS",
                   help="feed the data at this side instead of the trained one (a multiple of the patch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval)

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
    p.set_defaults(run=cmd_predict)

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
    p.set_defaults(run=cmd_soup)

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
    p.set_defaults(run=cmd_export)
    return parser


def _out_of_memory(e: Exception) -> str:
    """One line for an allocation torch could not make (too large a model, batch or input), else ''."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text):
        return ""
    asked = re.search(r"allocate (\d+) bytes", text)
    what = f"{int(asked.group(1)) / 2**30:.3g} GB asked for" if asked else text.split("\n")[0][:120]
    return f"out of memory ({what}): lower the batch, the model or the input size"


TAKES_OVERRIDES = ("train", "pretrain", "finetune", "distill", "study", "config")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("-")]  # the command (and config's COMMAND), roughly
    fields_for = " ".join(words[:2] if words[:1] == ["config"] else words[:1])
    parser, args = build_parser(fields_for), None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in TAKES_OVERRIDES:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command in (*TAKES_OVERRIDES, "eval"):
            args.run(args, extra)
        else:
            args.run(args)
    except UserError as e:  # a user's mistake: one line, no traceback
        print(f"vitscale: error: {' '.join(str(e).split())}", file=sys.stderr)
        return errors.EXIT_USER
    except errors.StopTraining as e:
        print(f"vitscale: stopped: {e}", file=sys.stderr)
        return errors.EXIT_STOPPED
    except errors.Interrupted as e:
        print(f"vitscale: interrupted: {e}", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a checkpoint itself)
        print("vitscale: interrupted: SIGINT", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one line, keep the traceback
        if getattr(args, "debug", False):
            raise
        if _out_of_memory(e):
            print(f"vitscale: error: {_out_of_memory(e)}", file=sys.stderr)
            return errors.EXIT_USER
        path = errors.write_crash(e)
        print(f"vitscale: internal error (a bug, not your input): {type(e).__name__}: {e}; "
              f"traceback in {path} (or rerun with --debug)", file=sys.stderr)
        return errors.EXIT_BUG
    return 0


if __name__ == "__main__":
    sys.exit(main())
