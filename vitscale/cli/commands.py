"""One function per `vitscale` command: each takes the parsed arguments, calls the library and
prints what it returned (a table, a line, or JSON with --json). The parser is cli.parser's;
exit codes are cli.main's (vitscale/cli/__init__.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from vitscale.cli import tables
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides, from_dict, merge
from vitscale.common.stats import pearson
from vitscale.cost import counted, measure, mfu, scaling
from vitscale.cost.complexity import cost
from vitscale.models.presets import preset, preset_names
from vitscale.models.vit import ViTConfig

# the commands `vitscale config COMMAND` prints the config of
CONFIG_COMMANDS = ("train", "pretrain", "finetune", "linprobe", "distill", "study")
# what `vitscale config` shows for weights the command needs but was not given
PLACEHOLDERS = {"init": "RUN_DIR_OR_WEIGHTS", "teacher": "TEACHER_RUN_DIR_OR_WEIGHTS"}


def _config(args: argparse.Namespace) -> ViTConfig:
    """The model preset the arguments name, with the input they set."""
    fields = ("image_size", "frames", "tubelet", "num_classes")
    return preset(args.model, **{f: getattr(args, f) for f in fields if getattr(args, f) is not None})


def cmd_models(args: argparse.Namespace) -> None:
    """Every preset with its cost."""
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
    """The cost of one config."""
    cfg = _config(args)
    record = {"name": args.model} | tables.cost_record(cfg, cost(cfg))
    if args.json:
        return tables.print_json(record)
    keys = ["name", "depth", "width", "heads", "patch", "image_size", "frames", "tokens",
            "params", "flops", "acts"]
    tables.console().print(tables.table("Cost (GFLOPs are multiply-adds per sample)", [record], keys))


def cmd_scale(args: argparse.Namespace) -> None:
    """The base model scaled by each strategy to each flops factor (--measure: timed too)."""
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
    seen: dict[ViTConfig, measure.Measurement] = {}
    for r, cfg in zip(records, configs, strict=True):
        if cfg not in seen:
            seen[cfg] = measure.measure(cfg, batch=args.batch, mode="train", dtype=args.dtype,
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
    """Measured throughput, latency, peak memory and MFU of one config."""
    cfg = _config(args)
    modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    c = cost(cfg)
    records = []
    for mode in modes:
        m = measure.measure(cfg, batch=args.batch, mode=mode, dtype=args.dtype, device=args.device,
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
        plain, ckpt = (measure.held(cfg, args.batch, args.dtype, args.device, act_ckpt=c) / 2**20
                       for c in (False, True))
        print(f"activations held for backward ({args.batch} samples, {args.dtype}): {plain:.1f} MB plain, "
              f"{ckpt:.1f} MB with every block checkpointed ({plain / max(ckpt, 1e-9):.1f}x less)")


def _run_config(args: argparse.Namespace, extra: list[str]):
    """The command's recipe, then --config, then --model, --init, --teacher, --out (else the run
    directory a run's own config.yaml lies in) and --section.key=value (config.layered)."""
    # local: a slow import that only the commands that train need (keeps `vitscale models` quick)
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
    """Train (pretrain, finetune, distill) one run, on every rank torchrun started."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
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
    # drawn by the command, not the engine: a study's trials and a library's runs have no use for
    # a picture each (matplotlib and the drawing cost a short run about a second)
    from vitscale.common import figures
    from vitscale.train.metrics import read_metrics

    if rows := read_metrics(Path(cfg.out)):
        figures.curves(rows, Path(cfg.out) / "curves.png")
    print(json.dumps(result) if args.json else
          f"done: {', '.join(f'{k} {v:.4g}' for k, v in result.items())}; results in {cfg.out}")


def _study_config(path: str | None, given: dict, extra: list[str]):
    """StudyConfig's defaults, then the --config file at `path`, then the flags' fields `given`
    ({field: text}); the trial overrides in `extra` (--section.key=value) go after the file's.
    All checked (the trials' run config too) before any work."""
    # local: a slow import that only the study's commands need (keeps `vitscale models` quick)
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
    """Run the study (or one --trial), or with --plan / --collect preview or report it."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
    from vitscale.study import preview, runner
    from vitscale.study.summary import as_json

    cfg = _study_config(args.config, args.fields, extra)

    if args.plan or args.collect:
        if args.trial or (args.plan and args.collect):
            raise UserError("--plan and --collect work on the whole study; give one, without --trial")
        if args.plan:
            plan = preview.describe(cfg)
            return tables.print_json(plan) if args.json else print("\n".join(preview.lines(plan)))
        summary = preview.collect(cfg)
    else:
        summary = runner.run_study(cfg, only=args.trial)
    if summary is None:
        return
    if args.json:
        print(as_json(summary))
        return
    _print_summary(summary, cfg.out)


def _print_summary(summary, out: str) -> None:
    """The study's verdict in a few lines: any family whose optimum the sizes do not bracket, its forecast
    across compute, its backtest, its recommendation, its best measured trial."""
    from vitscale.study.valleys import unbracketed  # local: a study's module, loaded by cmd_study already

    bt, rec, fc = summary.backtest, summary.recommendation, summary.forecast
    for v in unbracketed(summary.valleys):
        print(f"optimum not bracketed: {v.family}'s best at {v.compute:.3g} is {v.best}, "
              + (f"its {v.edge} size" if v.edge != "within noise" else "within noise of a neighbour")
              + "; the best size may lie outside those measured")
    if fc.checks:
        print(f"forecast: the law, fitted at or below {fc.cut:g} of each budget, predicts every trial at the "
              f"budget within {100 * fc.mean_abs_error:.1f} points on average "
              f"(max {100 * fc.max_abs_error:.1f}); "
              f"its pick {fc.pick} has regret {100 * fc.regret:.1f} (persistence's {fc.persistence}: "
              f"{100 * fc.persistence_regret:.1f})")
    if bt.checks:
        print(f"backtest: the law, fitted without {', '.join(bt.held_out)}, predicts them within "
              f"{100 * bt.mean_abs_error:.1f} points on average (max {100 * bt.max_abs_error:.1f}); "
              f"its intervals cover {bt.covered} of {len(bt.checks)}")
    if rec.pick:
        p = rec.pick
        print(f"recommended for {rec.budget}: {p.strategy} at {p.factor:.3g}x the base's flops (depth "
              f"{p.model.depth}, width {p.model.width}), {p.steps} steps, predicted {summary.metric} "
              f"{100 * p.accuracy:.1f}% ({100 * p.interval[0]:.1f}-{100 * p.interval[1]:.1f})"
              + (f"; unreliable: rests on {', '.join(p.bounds)} at a bound of the fit" if p.bounds else ""))
    for v in summary.verified:
        print(f"verified at {v.multiple:g}x the budget: {v.trial} measured {100 * v.mean:.1f}% against "
              f"{100 * v.predicted:.1f}% predicted ({100 * v.interval[0]:.1f}-{100 * v.interval[1]:.1f}): "
              + ("inside" if v.covered else "outside") + " the interval")
    m, best = rec.measured, rec.measured_best
    tie = (f"; within noise of it and cheaper: {m.name} at {m.steps} steps, {100 * m.accuracy:.1f}%"
           if m != best else "")
    print(f"best measured within the budget: {best.name} at {best.steps} steps, {100 * best.accuracy:.1f}%"
          f"{tie}; report in {out}/report.html")


def cmd_config(args: argparse.Namespace, extra: list[str]) -> None:
    """The config COMMAND would run with, as YAML with each field's help (a --config file)."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
    from vitscale.train import config, fieldhelp

    if args.of == "study":
        given = {k: v for k, v in (("model", args.model), ("out", args.out)) if v}
        cfg = _study_config(args.config, args.fields | given, extra)
    else:
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
    """Weights from one format to another, checked against the model they build."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
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
    """A run's best checkpoint scored on its validation and test data."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
    from vitscale.common import classnames
    from vitscale.runs.evaluate import evaluate_run
    from vitscale.train.rundir import RunDir

    result = evaluate_run(args.run_dir, device=args.device, test_views=args.test_views or "",
                          resolution=args.resolution)
    # the classes its metrics are over (the data's: an MAE's k-NN's too), by name
    run = RunDir(args.run_dir)
    names, named = run.classes(run.config().model.num_classes)
    if not named:
        print(f"note: {classnames.missing(args.run_dir, len(names))}", file=sys.stderr)
    if args.json:
        return print(json.dumps(result | {"classes": list(names)}))
    print(", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    print(f"classes ({len(names)}): {classnames.shown(names)}" if names else "no classes (unlabelled data)")


def cmd_predict(args: argparse.Namespace) -> None:
    """The top classes of each file by a trained run."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
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
    """The uniform (and --greedy) soup of fine-tuned runs, saved as a run."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
    from vitscale.runs import soup

    result = soup.soup(args.runs, args.out, use_greedy=args.greedy, device=args.device)
    if args.json:
        return tables.print_json(result)
    tables.console().print(soup.table(result))
    print(f"{soup.verdict(result)}; wrote {args.out}/soup.json and the {result['saved']} soup as a run "
          f"({args.out}/best)")


def cmd_export(args: argparse.Namespace) -> None:
    """A run's model as an ONNX graph, checked with onnxruntime."""
    # local: a slow import that only this command needs (keeps `vitscale models` quick)
    from vitscale.runs import export

    result = export.export(args.run_dir, args.to, args.out, args.batch, ema=args.ema)
    print(json.dumps({"written": [str(p) for p in result.files], "max_abs_diff": result.max_diff})
          if args.json else result.summary())
