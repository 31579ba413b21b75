"""GPU readiness in one run (`make gpu-check`): what vitscale does on a CUDA device, in about 8 minutes.

1. tests: the tests marked `cuda` (pytest -m cuda: bf16 autocast and SDPA's kernels, fp16 with
   GradScaler, torch.compile, FSDP on one GPU with sharded checkpoints, bitwise resume);
2. train: `vitscale train` of S/16 at 224 px for 200 steps, bf16, torch.compile'd, on generated data
   (cluttered-digits, 8 epochs of 25 steps): samples/s, MFU and data-wait of the epochs after the first
   (which compiles), and whether the loss fell;
3. bench: bench_vit's B/16 b128 bf16 train lines (vitscale against transformers of the same shape), one
   run eager and one compiled: the ratio of samples/s (above 1: vitscale faster) and both sides' MFU.

Each stage runs in a process of its own under a time limit (--timeout-*: 240 s, 150 s, 150 s a bench
run), so a hang or a slow compile costs its own stage only. Sized for 8 minutes on one H100 (compiling
S/16 and B/16 takes most of it); not yet timed on one.

Then a table, and JSON in OUT/gpu-check.json (default OUT: runs/gpu-check/TIME, which git ignores).
Exit 0 when every stage passed. Without a CUDA device (and --device auto) it says so in one line and
exits 0, before anything else. --install first installs this checkout into the running python
(pip --no-deps --no-build-isolation -e: the GPU machine reaches no registry); without it, or if it
fails, the stages run the checkout through PYTHONPATH.

    python benchmarks/gpu_check.py --install          # make gpu-check
    python benchmarks/gpu_check.py --device cpu --no-tests --preset pico/4 --image-size 32 --batch 8 \\
        --steps 2 --val-size 16 --no-compile --bench-models pico/4:8 --bench-rounds 1   # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 8  # the training's steps fall in this many epochs: the first compiles, the rest are timed


@dataclass
class Stage:
    """One stage's outcome: a line for the table and its figures for the JSON."""

    name: str
    ok: bool
    seconds: float
    summary: str  # one line: the figures a reader wants
    figures: dict = field(default_factory=dict)


def environment() -> dict[str, str]:
    """The stages' environment: this checkout importable whether or not it is installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run a stage's command, its output to `log` and the terminal's tail; (exit code, seconds); a
    command past `timeout` seconds is stopped (exit code 124)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=environment(), cwd=ROOT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def failed(name: str, code: int, seconds: float, log: Path) -> Stage:
    """A stage whose command failed: its last line says why."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    why = "timed out" if code == 124 else f"exit {code}: {lines[-1][:160] if lines else 'no output'}"
    return Stage(name, False, seconds, f"{why} (log {log})")


def tests(args: argparse.Namespace, out: Path) -> Stage:
    """pytest -m cuda: counts of passed, failed and skipped from its JUnit XML."""
    xml = out / "cuda-tests.xml"
    code, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                         f"--junitxml={xml}", *args.tests], out / "tests.log", args.timeout_tests)
    if not xml.is_file():
        return failed("tests", code, seconds, out / "tests.log")
    counts = junit_counts(xml)
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped"))
    ok = code == 0 and counts["failed"] == 0 and counts["passed"] > 0
    return Stage("tests", ok, seconds, summary + (f": {', '.join(counts['failures'])}" if counts["failures"]
                                                   else ""), counts)


def junit_counts(xml: Path) -> dict:
    """{"passed", "failed" (failures and errors), "skipped": counts, "failures": their names}."""
    cases = ET.parse(xml).getroot().iter("testcase")
    outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        tags = {child.tag for child in case}
        kind = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        outcome[kind].append(case.get("name", "?"))
    return {k: len(v) for k, v in outcome.items()} | {"failures": outcome["failed"]}


def train(args: argparse.Namespace, out: Path) -> Stage:
    """vitscale train, bf16 and compiled, on generated data at the preset's size; the steady epochs'
    throughput from the run's metrics.jsonl."""
    run_dir = out / "train"
    steps_per_epoch = max(1, args.steps // EPOCHS)
    cmd = [sys.executable, "-m", "vitscale", "train", "--model", args.preset, "--out", str(run_dir),
           # crops of the whole frame: loading keeps up with the GPU, so the figures are the model's
           "--data.name=cluttered-digits", f"--data.image_size={args.image_size}", "--data.scale_min=1",
           f"--data.train_size={steps_per_epoch * args.batch}", f"--data.val_size={args.val_size}",
           "--data.test_size=0",
           f"--data.workers={args.workers}", f"--train.batch={args.batch}", f"--train.max_steps={args.steps}",
           f"--train.device={args.device}", f"--train.dtype={args.dtype}", f"--train.compile={args.compile}"]
    code, seconds = run(cmd, out / "train.log", args.timeout_train)
    if code != 0:
        return failed("train", code, seconds, out / "train.log")
    figures = training_figures(run_dir / "metrics.jsonl")
    mfu = figures["mfu"]
    summary = (f"{args.preset} {args.image_size} px b{args.batch} {args.dtype}"
               f"{' compiled' if args.compile else ''}, {figures['steps']} steps: "
               f"{figures['samples_per_s']:.1f} samples/s"
               + (f", MFU {mfu:.1%}" if mfu is not None else "")
               + f", data-wait {figures['data_wait']:.0%}, first epoch {figures['first_epoch_s']:.1f} s, "
               f"loss {figures['first_loss']:.3f} -> {figures['last_loss']:.3f}")
    ok = figures["steps"] == args.steps and math.isfinite(figures["last_loss"])
    return Stage("train", ok, seconds, summary, figures | {"run_dir": str(run_dir)})


def training_figures(metrics: Path) -> dict:
    """Samples/s, MFU and data-wait: medians over the epochs after the first (all when there is one);
    the first epoch's seconds (with torch.compile: mostly compiling); the first and last losses."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    epochs = [r for r in rows if r["split"] == "val"]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    steady = epochs[1:] or epochs

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": rows[-1]["step"] if rows else 0, "samples_per_s": median("samples_per_s"),
            "mfu": median("mfu"), "data_wait": median("data_wait"), "first_epoch_s": epochs[0]["train_s"],
            "first_loss": losses[0], "last_loss": losses[-1], "epochs": len(epochs)}


def bench(args: argparse.Namespace, out: Path) -> list[Stage]:
    """bench_vit.py's train lines for --bench-models in the dtype, one run for eager models and one for
    compiled ones (each its own time limit: the compiled run, mostly compiling, may run out alone)."""
    return [bench_run(args, out, compiled) for compiled in args.bench_compile]


def bench_run(args: argparse.Namespace, out: Path, compiled: str) -> Stage:
    """One bench_vit run (--compile off or on): its training cells' ratio and MFU."""
    name = "bench " + {"off": "eager", "on": "compiled"}[compiled]
    result, log = out / f"bench_vit-{compiled}.json", out / f"bench-{compiled}.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vit.py"), "--device", args.device,
           "--models", args.bench_models, "--dtype", args.dtype, "--modes", "train", "--compile", compiled,
           "--json", str(result)]
    cmd += ["--rounds", str(args.bench_rounds), "--iters", "1", "--warmup", "1"] if args.bench_rounds else []
    code, seconds = run(cmd, log, args.timeout_bench)
    if code != 0 or not result.is_file():
        return failed(name, code or 1, seconds, log)
    cells = json.loads(result.read_text())["cells"]
    parts = []
    for c in cells:
        mfu = c["vitscale"]["mfu"]
        parts.append(f"{c['config']} b{c['batch']} {c['dtype']} train: ratio {c['ratio']:.2f}x"
                     + (f", MFU {mfu:.1%} (hf {c['hf']['mfu']:.1%})" if mfu is not None else "")
                     + (f", compiling {c['vitscale']['compile_s']:.0f} s" if compiled == "on" else ""))
    figures = {"cells": cells, "json": str(result)}
    return Stage(name, bool(cells), seconds, "; ".join(parts) or "no cells", figures)


def table(stages: list[Stage]) -> str:
    """The stages as fixed-width text: name, result, seconds, summary."""
    lines = [f"{'stage':<14} {'result':<6} {'seconds':>8}  figures"]
    lines += [f"{s.name:<14} {'ok' if s.ok else 'FAILED':<6} {s.seconds:>8.1f}  {s.summary}" for s in stages]
    return "\n".join(lines)


def write(stages: list[Stage], env: dict, path: Path) -> None:
    """gpu-check.json: the environment and every stage, written whole (temporary file, rename)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(env | {"ok": all(s.ok for s in stages), "stages": [asdict(s) for s in stages]},
                              indent=2) + "\n")
    tmp.replace(path)


def wanted() -> list[str]:
    """The distributions the stages use: pyproject's dependencies, pytest and transformers."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = [") :].split("]", 1)[0]
    return re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block, re.M) + ["pytest", "transformers"]


def missing() -> list[str]:
    """What of `wanted` this python lacks: a failed stage's likely cause on a machine that reaches
    no registry."""
    from importlib import metadata

    lacking = []
    for name in wanted():
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            lacking.append(name)
    return lacking


def install() -> Stage:
    """This checkout into the running python, without dependencies or a build environment."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "-e", str(ROOT)], capture_output=True, text=True)
    said = (proc.stdout + proc.stderr).strip().splitlines()
    summary = "pip install -e . done" if proc.returncode == 0 else \
        f"pip install failed ({said[-1][:120] if said else proc.returncode}); running the checkout"
    return Stage("install", proc.returncode == 0, time.perf_counter() - start, summary)


def marked() -> list[str]:
    """The test files that hold tests marked cuda."""
    files = sorted((ROOT / "tests").rglob("test_*.py"))  # the tests mirror the package's folders
    return [str(p) for p in files if "pytest.mark.cuda" in p.read_text()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda, or stop: no CUDA device), cuda or cpu")
    p.add_argument("--install", action="store_true", help="pip install -e this checkout first (a GPU "
                   "machine's own python)")
    p.add_argument("--out", type=Path, help="folder for the logs, the run and gpu-check.json "
                   "(default runs/gpu-check/TIME)")
    p.add_argument("--no-tests", dest="run_tests", action="store_false", help="leave out the cuda tests")
    p.add_argument("--tests", nargs="+", default=marked(), help="test files pytest collects (default: those "
                   "that mark tests cuda, so a module needing what the GPU machine lacks is not imported)")
    p.add_argument("--preset", default="S/16", help="the trained model")
    p.add_argument("--image-size", type=int, default=224, help="its input side in pixels")
    p.add_argument("--batch", type=int, default=256, help="training batch")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--val-size", type=int, default=512, help="validation items scored after each epoch")
    p.add_argument("--dtype", default="bf16", help="training and benchmark dtype")
    p.add_argument("--compile", default=True, action=argparse.BooleanOptionalAction,
                   help="torch.compile the trained model (default on)")
    p.add_argument("--workers", type=int, help="data loader workers (default: 8 on a GPU, 0 on a CPU)")
    p.add_argument("--bench-models", default="B/16:128", help="bench_vit --models (PRESET:BATCH,...)")
    p.add_argument("--bench-compile", type=lambda t: [c for c in t.split(",") if c in ("off", "on")],
                   help="bench_vit runs: off, on or off,on (default off,on on a GPU, off on a CPU)")
    p.add_argument("--bench-rounds", type=int, default=0, help="bench_vit rounds of one step each "
                   "(0 = bench_vit's own timing)")
    for stage, seconds in (("tests", 240), ("train", 150), ("bench", 150)):
        p.add_argument(f"--timeout-{stage}", type=float, default=seconds, help=f"seconds the {stage} "
                       f"stage (each bench run) may take (default {seconds})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if args.device == "auto" and not (torch and torch.cuda.is_available()):
        print("gpu-check: no CUDA device; nothing to check here"
              + ("" if torch else f" (no torch in {sys.executable}: GPU_PYTHON=... make gpu-check)"))
        return 0
    args.device = "cuda" if args.device == "auto" else args.device
    gpu = args.device.startswith("cuda")
    args.workers = args.workers if args.workers is not None else (8 if gpu else 0)
    args.bench_compile = args.bench_compile or (["off", "on"] if gpu else ["off"])
    out = args.out or ROOT / "runs" / "gpu-check" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    name = torch.cuda.get_device_name(args.device) if gpu else args.device
    env = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "missing": missing()}
    print(f"gpu-check on {name}: torch {env['torch']} (CUDA {env['cuda']}); logs in {out}"
          + (f"; not installed: {', '.join(env['missing'])}" if env["missing"] else ""), flush=True)
    stages = [install()] if args.install else []
    for stage in [tests, train, bench] if args.run_tests else [train, bench]:
        result = stage(args, out)
        for done in result if isinstance(result, list) else [result]:
            stages.append(done)
            print(f"{done.name}: {'ok' if done.ok else 'FAILED'}: {done.summary}", flush=True)
    print(table(stages))
    write(stages, env, out / "gpu-check.json")
    print(f"wrote {out / 'gpu-check.json'}")
    return 0 if all(s.ok for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
