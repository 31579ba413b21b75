"""Learning-rate transfer across width and depth: SP against muP, trained by the engine, in one run.

For each parametrisation (sp, mup) and each shape (the base pico/4 at 16 px: width 64, depth
4, head dim 32; 4x and 8x its width; 4x its depth) it trains one run per base LR on a
geometric grid for the same number of steps (warm-up, then cosine to ~0) and reads the final
validation loss. Widths keep the base's head dim of 32 (more heads, as the study's scaler
keeps head dims near the base's), so muP's 1/d attention equals SP's here; the coordinate
check in tests/models/test_mup.py covers a growing head dim. muP shapes are relative to the base.

The best LR of a shape is the grid point with the lowest validation loss, refined by a
parabola in log LR through it and its neighbours (the figure printed; "edge" marks an
optimum on the grid's edge, where the true one may lie beyond it). Validation loss rather
than top-1: at these lengths top-1 over 359 images ties between neighbouring rates.
The spread of a parametrisation is max / min of its best LRs over the shapes; muP's target
is at most 2x. A last muP sweep at 4x depth uses the other depth LR rule (hidden matrices'
LR x depth_mult^-0.5, Tensor Programs VI's for Adam, against vitscale's 0: DEPTH_LR_EXPONENT),
to tell which one transfers.

    python benchmarks/bench_transfer.py --quick      # half-size shapes, 5 rates, 60 steps: a few minutes
    python benchmarks/bench_transfer.py --lengths 2,4  # also muP's base at 2x and 4x the steps (default)
    python benchmarks/bench_transfer.py --quick --steps 250 --axis lengths   # the length axis alone
    python benchmarks/bench_transfer.py              # pico/4 shapes, 6 rates, 200 steps: ~40 minutes
    python benchmarks/bench_transfer.py --json out/bench_transfer.json

Runtime: one thread per run; 8x width takes about 2 minutes a run on an idle core, 60% of the
total. Measured (cluttered-digits, 200 steps of batch 32, seed 0): muP's best base LR 0.0086
to 0.0105 at every shape (spread 1.23x), SP's moves from 0.0097 to 0.0025 (grid edge) at 4x
width, 0.0045 at 8x width and 0.017 at 4x depth (spread 6.86x). At 4x depth the depth-muP
Adam rule (hidden LR x depth_mult^-0.5) moves the best LR 1.76x, vitscale's rule (none) 0.89x.
At these lengths SP's wide models at their own best LR reach lower loss than muP's at the
transferred one (8x width: 1.34 against 1.84): muP fixes where the optimum is, not how fast a
wide model learns in 200 steps. One seed: neighbouring rates are noisy (0.02 is often worse
than 0.04), so read the spreads as coarse.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from vitscale.cli.tables import console  # noqa: E402
from vitscale.common.device import pick_device  # noqa: E402
from vitscale.common.records import apply_overrides
from vitscale.models import vit  # noqa: E402
from vitscale.train import engine  # noqa: E402
from vitscale.train.config import RunConfig

HEAD_DIM = 32  # the base's head dim, kept at every width


@dataclass(frozen=True)
class Shape:
    name: str  # as printed
    width: int
    depth: int
    depth_lr_exponent: float = vit.DEPTH_LR_EXPONENT  # muP only: hidden LR x depth_mult^-this


@dataclass(frozen=True)
class Cell:
    param: str  # "sp" or "mup"
    shape: str
    base_lr: float  # lr = base_lr x batch / 256
    steps: int
    val_loss: float  # final; inf if the run diverged
    val_top1: float
    seconds: float


def shapes(quick: bool) -> tuple[Shape, list[Shape]]:
    """(base, shapes swept); --quick halves the base width and depth."""
    w, d = (32, 2) if quick else (64, 4)
    base = Shape("base", w, d)
    return base, [base, Shape("4x width", 4 * w, d), Shape("8x width", 8 * w, d), Shape("4x depth", w, 4 * d)]


def run_config(param: str, shape: Shape, base: Shape, base_lr: float, steps: int, args,
               out: Path) -> RunConfig:
    """One trial: pico/4-like at 16 px on the benchmark's data for `steps` steps."""
    overrides = [
        f"data.name={args.data}", "data.image_size=16", "data.scale_min=1", "model.patch_size=4",
        f"data.train_size={steps * args.batch}", "data.val_size=2000",  # cluttered-digits: one pass
        f"model.width={shape.width}", f"model.depth={shape.depth}", f"model.heads={shape.width // HEAD_DIM}",
        f"model.param={param}", f"model.base_width={base.width}", f"model.base_depth={base.depth}",
        f"model.base_head_dim={HEAD_DIM}", f"train.batch={args.batch}", f"train.max_steps={steps}",
        "train.epochs=1000", f"train.warmup_epochs={args.warmup_epochs}", "train.min_lr=0",
        f"train.base_lr={base_lr}", "train.label_smoothing=0", "train.knn_k=0",
        f"train.threads={args.threads}", f"train.device={args.device}", f"train.seed={args.seed}",
        "train.keep_last=1",
    ]
    return apply_overrides(RunConfig(out=str(out)), overrides)


@contextlib.contextmanager
def depth_lr_exponent(value: float):
    """Train under another depth LR rule (the library's constant, put back afterwards)."""
    saved, vit.DEPTH_LR_EXPONENT = vit.DEPTH_LR_EXPONENT, value
    try:
        yield
    finally:
        vit.DEPTH_LR_EXPONENT = saved


def train_cell(param: str, shape: Shape, base: Shape, base_lr: float, steps: int, args, root: Path) -> Cell:
    out = root / f"{param}-{shape.name.replace(' ', '_')}-{shape.depth_lr_exponent:g}-{base_lr:.3g}-{steps}"
    cfg = run_config(param, shape, base, base_lr, steps, args, out)
    t0 = time.perf_counter()
    with depth_lr_exponent(shape.depth_lr_exponent), contextlib.redirect_stdout(None):
        try:
            result = engine.train(cfg).metrics
        except engine.StopTraining:
            result = {"val_loss": math.inf, "val_top1": 0.0}
    loss = result["val_loss"] if math.isfinite(result["val_loss"]) else math.inf
    return Cell(param, shape.name, base_lr, steps, loss, result["val_top1"], time.perf_counter() - t0)


def best_lr(cells: list[Cell]) -> tuple[float, bool]:
    """(best base LR: the grid argmin of val loss refined by a parabola in log LR, on the grid's edge?)."""
    cells = sorted(cells, key=lambda c: c.base_lr)
    losses = [c.val_loss for c in cells]
    i = int(np.argmin(losses))
    if i in (0, len(cells) - 1) or not all(math.isfinite(v) for v in losses[i - 1:i + 2]):
        return cells[i].base_lr, i in (0, len(cells) - 1)
    x = np.log([c.base_lr for c in cells[i - 1:i + 2]])
    a, b, _ = np.polyfit(x, losses[i - 1:i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[1]
    return float(np.exp(np.clip(vertex, x[0], x[2]))), False


def table(cells: list[Cell], lrs: list[float], bests: dict) -> Table:
    t = Table(title="final val loss (val top-1) by base LR; best = parabola through the grid argmin")
    t.add_column("param")
    t.add_column("shape")
    for lr in lrs:
        t.add_column(f"{lr:.2g}", justify="right")
    t.add_column("best base LR", justify="right")
    for (param, shape), (lr, edge) in bests.items():
        row = {c.base_lr: c for c in cells if (c.param, c.shape) == (param, shape)}
        t.add_row(param, shape, *[f"{row[lr].val_loss:.3f} ({row[lr].val_top1:.2f})" for lr in lrs],
                  f"{lr:.3g}{' edge' if edge else ''}")
    return t


def length_axis(cells: list[Cell], lengths: list[int], lrs: list[float], out) -> dict:
    """muP's base at each length: its best rate, and the study's rule (rates.py: a straight line in
    log rate against log steps through the shortest and the longest length's best) at each length
    between, against the best measured there."""
    base = [c for c in cells if (c.param, c.shape) == ("mup", "base")]
    found = {n: best_lr([c for c in base if c.steps == n]) for n in lengths}
    t = Table(title="muP base: final val loss by base LR and length; rule = the line through the ends")
    for col in ("steps", *(f"{lr:.2g}" for lr in lrs), "best base LR", "rule's"):
        t.add_column(col, justify="right")
    lo, hi = min(lengths), max(lengths)
    slope = math.log(found[hi][0] / found[lo][0]) / math.log(hi / lo)
    rows = {}
    for n in lengths:
        row = {c.base_lr: c for c in base if c.steps == n}
        rule = found[lo][0] * (n / lo) ** slope
        rows[n] = {"best": found[n][0], "edge": found[n][1], "rule": rule}
        t.add_row(str(n), *[f"{row[lr].val_loss:.3f}" for lr in lrs],
                  f"{found[n][0]:.3g}{' edge' if found[n][1] else ''}", f"{rule:.3g}")
    out.print(t)
    middle = [n for n in lengths if lo < n < hi]
    out.print(f"best base LR ~ steps^{slope:.2f} from {lo} to {hi} steps; between them the rule is off by "
              + ", ".join(f"{rows[n]['rule'] / rows[n]['best']:.2f}x at {n}" for n in middle))
    return {"exponent": slope, "lengths": {str(n): v for n, v in rows.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = bench_common.parser(__doc__)
    p.add_argument("--data", default="cluttered-digits", help="dataset name")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 200; --quick 60)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup-epochs", type=float, default=0.25, help="warm-up length (1 epoch = 44 steps)")
    p.add_argument("--lrs", type=str, help="comma-separated base LRs (default: 6, --quick 5, x2 apart)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--lengths", type=str, default="2,4",
                   help="the length axis: muP's base again at these multiples of --steps ('' for none)")
    p.add_argument("--axis", choices=("both", "shapes", "lengths"), default="both",
                   help="what to sweep: the shapes at --steps, the lengths of muP's base, or both")
    p.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary one)")
    args = p.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 200)
    if args.lrs:
        lrs = [float(v) for v in args.lrs.split(",")]
    else:
        lrs = [0.01 * 2.0**k for k in (range(-1, 4) if args.quick else range(-2, 4))]
    device = pick_device(args.device)
    args.device = device.type
    torch.set_num_threads(args.threads)
    env = bench_common.environment(device)
    out = console()
    out.print(bench_common.environment_line(env))
    base, swept = shapes(args.quick)
    other = 0.5 if vit.DEPTH_LR_EXPONENT == 0 else 0.0
    variant = replace(swept[-1], name=f"{swept[-1].name}, depth LR ^-{other:g}", depth_lr_exponent=other)
    plan = [(param, s) for param in ("sp", "mup") for s in swept] + [("mup", variant)]
    out.print(f"{len(plan)} sweeps x {len(lrs)} base LRs, {args.steps} steps of batch {args.batch} on "
                  f"{args.data} at 16 px; base width {base.width}, depth {base.depth}, head dim {HEAD_DIM}")
    lengths = [args.steps] + [round(float(m) * args.steps) for m in args.lengths.split(",") if m.strip()]
    if args.axis == "lengths":
        plan = [("mup", base)]
    lengths = lengths if args.axis != "shapes" else lengths[:1]
    runs = [(param, s, args.steps) for param, s in plan] + [("mup", base, n) for n in lengths[1:]]
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for param, shape, steps in runs:
            for lr in lrs:
                cells.append(train_cell(param, shape, base, lr, steps, args, root))
                c = cells[-1]
                out.print(f"  {param:3s} {shape.name:22s} {steps:5d} steps base_lr {lr:<8.3g} val loss "
                          f"{c.val_loss:.4f} top-1 {c.val_top1:.3f} ({c.seconds:.0f} s)")
    at_steps = [c for c in cells if c.steps == args.steps]
    bests = {(param, s.name): best_lr([c for c in at_steps if (c.param, c.shape) == (param, s.name)])
             for param, s in plan}
    by_length = length_axis(cells, lengths, lrs, out) if len(lengths) > 2 else {}
    if args.axis == "lengths":
        result = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "lrs": lrs,
                  "cells": [asdict(c) for c in cells], "by_length": by_length}
        bench_common.write_json(args.json, result)
        return result
    out.print(table(at_steps, lrs, bests))
    spreads = {}
    for param in ("sp", "mup"):
        found = {shape: lr for (q, shape), (lr, _) in bests.items() if q == param and "depth LR" not in shape}
        base_lr = found["base"]
        spreads[param] = max(found.values()) / min(found.values())
        moves = ", ".join(f"{shape} {lr:.3g} ({lr / base_lr:.2f}x)" for shape, lr in found.items())
        out.print(f"{param}: best base LR {moves}; spread max/min {spreads[param]:.2f}x")
    depth_rules = {s: bests[("mup", s)][0] / bests[("mup", "base")][0] for (q, s) in bests
                   if q == "mup" and "depth" in s}
    out.print("mup depth LR rules, best LR at 4x depth over the base's: " +
                  ", ".join(f"{s}: {r:.2f}x" for s, r in depth_rules.items()))
    out.print(f"target: muP spread <= 2x: {'met' if spreads['mup'] <= 2 else 'NOT met'} "
                  f"({spreads['mup']:.2f}x; SP {spreads['sp']:.2f}x)")
    result = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "lrs": lrs,
              "cells": [asdict(c) for c in cells],
              "best": [{"param": q, "shape": s, "base_lr": lr, "edge": edge}
                       for (q, s), (lr, edge) in bests.items()],
              "spread": spreads, "depth_rules": depth_rules, "by_length": by_length}
    bench_common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
