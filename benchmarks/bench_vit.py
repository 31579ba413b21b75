"""vitscale's ViT against Hugging Face transformers' ViT of exactly the same shape, in one run.

Each cell (config x compile x dtype x mode) builds ViT(cfg) and a transformers
ViTForImageClassification with the same width, depth, heads, MLP, patch, image size and
classes (SDPA attention, no dropout, exact GELU, LayerNorm eps 1e-6; no pooler, so the
parameter counts must be equal, and are asserted to be). Both take the same random
input and are timed with vitscale.cost.measure.measure_model in alternating rounds (ours then
HF, then HF then ours, ...) so that load from other processes on a shared machine hits
both sides alike; each side keeps its best round (a round's figure is its median step).
Best-of is the figure to trust on a shared machine: contention only ever slows a step.

Read the ratio as vitscale samples/s over HF samples/s: above 1.00x vitscale is faster,
below it is slower. The architectures compute the same function; vitscale fuses q, k, v
into one matmul where HF runs three, so differences are kernel- and launch-level.

With --compile on both sides are torch.compile'd (so the ratio stays like for like); the
first round's warm-up steps absorb the compilation, whose seconds are printed apart (that
round's warm-up time less as many steady steps). Read those seconds as rough: inductor keeps
compiled graphs on disk, so a shape compiled before, by any run, compiles in a fraction of the
time; kernels both sides share are built once, by the side that opens the cell (vitscale), which
in a process's first compile also pays inductor's start-up. Where the device's
peak is known (a GPU in vitscale.cost.mfu's table, or --peak-tflops) each line also gives the MFU
of both sides: 2 x the multiply-adds FlopCounterMode counts per sample (forward, plus backward
in training) x samples/s over the dtype's dense peak; both sides compute the same function,
so one count serves both. The issue's targets read off the GPU run's B/16 bf16 train lines:
ratio at least 1.3x and vitscale's MFU at least 45% on an H100.

    python benchmarks/bench_vit.py                 # CPU: S/16 (224 px, b32) and pico/4 (32 px, b64)
    python benchmarks/bench_vit.py --quick         # pico/4 only, a few seconds
    python benchmarks/bench_vit.py --models S/16:8 --compile off,on --dtype fp32 --threads 1
    python benchmarks/bench_vit.py --device cuda --dtype bf16 --json out/bench_vit.json
                                                   # GPU: B/16 (b128) and S/16 (b256), compile off and on
    python benchmarks/bench_vit.py --device cuda --models B/16:128 --dtype bf16 --modes train
                                                   # the B/16 b128 bf16 train lines alone (make gpu-check)

Runtime: about 4 minutes on an idle 2-core CPU with the defaults (steps run up to 3x longer
when other jobs share the cores; --compile off,on adds the compilation and as many timed
rounds again); on a GPU a few minutes, most of it compiling.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import torch  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from vitscale.cli.tables import console  # noqa: E402
from vitscale.common.device import (
    DTYPES,  # noqa: E402
    pick_device,  # noqa: E402
)
from vitscale.cost import counted, mfu  # noqa: E402
from vitscale.cost.measure import Measurement, example_input, measure_model  # noqa: E402
from vitscale.models.presets import preset  # noqa: E402
from vitscale.models.vit import ViT, ViTConfig, param_count  # noqa: E402

MODES = ("infer", "train")
COMPILE = ("off", "on")


@dataclass(frozen=True)
class Setting:
    """One model shape to compare and how long to time it."""

    preset: str  # vitscale preset name
    batch: int  # samples per step
    warmup: int  # untimed steps before a side's first round (see round_warmup)
    iters: int  # timed steps per round; the round reports their median
    rounds: int  # alternating rounds per side; each side keeps its best


# Many single-step rounds: a fine interleave, and the best step is the one least disturbed by
# other load. S/16 train steps take seconds on two CPU cores; pico/4 steps take milliseconds.
# On a GPU steps are short and the device is not shared: fewer rounds of ten steps, at the
# batches ViT-B/16 trains with (per device).
SETTINGS = {"cpu": (Setting("S/16", 32, 1, 1, 4), Setting("pico/4", 64, 3, 1, 40)),
            "gpu": (Setting("B/16", 128, 5, 10, 4), Setting("S/16", 256, 5, 10, 4))}  # cuda, mps
QUICK = (Setting("pico/4", 64, 1, 1, 8),)
COMPILE_WARMUP = 2  # at least this many untimed steps before a compiled side's first round


def hf_peer(cfg: ViTConfig) -> nn.Module:
    """transformers' ViTForImageClassification with the shape of ViT(cfg), SDPA attention."""
    transformers = bench_common.transformers()
    if cfg.is_video or cfg.pool != "cls" or cfg.pos_embed != "learned" or not cfg.num_classes:
        raise ValueError("the HF peer matches image ViTs with a cls token, learned positions and a head")
    hf_cfg = transformers.ViTConfig(
        hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_hidden, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, qkv_bias=cfg.qkv_bias, layer_norm_eps=1e-6, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=cfg.num_classes,
        attn_implementation="sdpa",
    )
    model = transformers.ViTForImageClassification(hf_cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def hf_loss(out) -> torch.Tensor:
    """Scalar loss from an HF output object (its logits), as the default does for a tensor."""
    return out.logits.float().mean()


def build_pair(cfg: ViTConfig, device: torch.device, seed: int) -> tuple[nn.Module, nn.Module, int]:
    """(vitscale model, HF model, shared parameter count) on the device; fails if counts differ."""
    torch.manual_seed(seed)
    ours = ViT(cfg).to(device)
    torch.manual_seed(seed)
    peer = hf_peer(cfg).to(device)
    n_ours, n_peer = param_count(ours), param_count(peer)
    assert n_ours == n_peer, f"shape drift: vitscale has {n_ours:,} parameters, HF {n_peer:,}"
    return ours, peer, n_ours


def best(ms: list[Measurement]) -> Measurement:
    """The round with the highest throughput."""
    return max(ms, key=lambda m: m.samples_per_s)


def round_warmup(s: Setting, r: int, mode: str, compiled: bool = False) -> int:
    """Untimed steps before round r: all of them first (with compilation, at least COMPILE_WARMUP),
    then one per train round (its fresh AdamW)."""
    if r == 0:
        return max(s.warmup, COMPILE_WARMUP) if compiled else s.warmup
    return min(s.warmup, 1) if mode == "train" else 0  # AdamW allocates its state on its first step


def time_cell(ours: nn.Module, peer: nn.Module, x: torch.Tensor, mode: str, dtype: str,
              s: Setting, compiled: bool = False) -> tuple[list[Measurement], list[Measurement]]:
    """Every round's measurement of each side (the first round first), alternating which side
    goes first every round."""
    sides = {"ours": (ours, None), "peer": (peer, hf_loss)}
    runs: dict[str, list[Measurement]] = {"ours": [], "peer": []}
    for r in range(s.rounds):
        for name in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            model, loss_fn = sides[name]
            warmup = round_warmup(s, r, mode, compiled)
            runs[name].append(measure_model(model, x, mode, dtype, warmup, s.iters, loss_fn))
    return runs["ours"], runs["peer"]


def compile_seconds(rounds: list[Measurement], warmup: int) -> float:
    """Seconds the first round's `warmup` steps took beyond as many steady (best-round) steps:
    with torch.compile, the compilation."""
    return max(0.0, rounds[0].warmup_s - warmup * best(rounds).ms_per_step / 1000)


def side(m: Measurement, macs: float, peak: float | None) -> dict:
    """One side's best round, with its MFU (None without a peak)."""
    return m.as_dict() | {"mfu": mfu.mfu(m.samples_per_s, macs, peak)}


def summary(cell: dict) -> str:
    """One greppable line: 'B/16 b128 bf16 train compile on: vitscale 1234.5/s  hf 950.0/s  ratio 1.30x
    MFU vitscale 46.1%  hf 35.5%  (compiling: vitscale 41.0 s, hf 45.2 s)'."""
    a, b = cell["vitscale"], cell["hf"]
    line = (f"{cell['config']} b{cell['batch']} {cell['dtype']} {cell['mode']} compile {cell['compile']}: "
            f"vitscale {a['samples_per_s']:.1f}/s  hf {b['samples_per_s']:.1f}/s  ratio {cell['ratio']:.2f}x")
    if a["mfu"] is not None:
        line += f"  MFU vitscale {a['mfu']:.1%}  hf {b['mfu']:.1%}"
    if cell["compile"] == "on":
        line += f"  (compiling: vitscale {a['compile_s']:.1f} s, hf {b['compile_s']:.1f} s)"
    return line


def run_setting(s: Setting, device: torch.device, args: argparse.Namespace) -> list[dict]:
    """All compile x dtype x mode cells of one config; prints each summary line as it finishes."""
    cfg = preset(s.preset)
    ours, peer, params = build_pair(cfg, device, args.seed)
    print(f"{s.preset}: {params:,} parameters on both sides (vitscale == HF)", flush=True)
    torch.manual_seed(args.seed)
    x = example_input(cfg, s.batch, device)
    macs = {mode: counted.macs_per_sample(cfg, mode) for mode in MODES}
    cells = []
    for comp in args.compile:
        on = comp == "on"
        # the compiled modules share the eager ones' parameters; each compiles once per mode x dtype
        pair = (torch.compile(ours, backend=args.compile_backend),
                torch.compile(peer, backend=args.compile_backend)) if on else (ours, peer)
        for dtype in args.dtype:
            peak = mfu.peak_tflops(device, dtype, args.peak_tflops)
            for mode in args.modes:
                r_ours, r_peer = time_cell(*pair, x, mode, dtype, s, on)
                m_ours, m_peer = best(r_ours), best(r_peer)
                a, b = side(m_ours, macs[mode], peak), side(m_peer, macs[mode], peak)
                if on:
                    first = round_warmup(s, 0, mode, on)
                    a["compile_s"], b["compile_s"] = (compile_seconds(r, first) for r in (r_ours, r_peer))
                cells.append({
                    "config": s.preset, "batch": s.batch, "dtype": dtype, "mode": mode, "compile": comp,
                    "params": params, "macs_per_sample": macs[mode], "peak_tflops": peak,
                    "vitscale": a, "hf": b, "ratio": m_ours.samples_per_s / m_peer.samples_per_s,
                })
                print(summary(cells[-1]), flush=True)
    return cells


def speedups(cells: list[dict]) -> list[str]:
    """'compile on / off, S/16 b32 fp32 train: vitscale 1.21x  hf 1.10x  (vitscale on / hf off 1.35x)'
    for each cell timed both ways: what compiling gains each side, and compiled vitscale against
    transformers as it runs by default (eager)."""
    off = {(c["config"], c["batch"], c["dtype"], c["mode"]): c for c in cells if c["compile"] == "off"}
    lines = []
    for c in cells:
        key = (c["config"], c["batch"], c["dtype"], c["mode"])
        if c["compile"] == "on" and key in off:
            gain = {k: c[k]["samples_per_s"] / off[key][k]["samples_per_s"] for k in ("vitscale", "hf")}
            mixed = c["vitscale"]["samples_per_s"] / off[key]["hf"]["samples_per_s"]
            lines.append(f"compile on / off, {key[0]} b{key[1]} {key[2]} {key[3]}: "
                         f"vitscale {gain['vitscale']:.2f}x  hf {gain['hf']:.2f}x  "
                         f"(vitscale on / hf off {mixed:.2f}x)")
    return lines


def results_table(cells: list[dict]) -> Table:
    """Rich table of the cells: throughput of each side, the ratio, and MFU where a peak is known."""
    with_mfu = any(c["vitscale"]["mfu"] is not None for c in cells)
    t = Table(title="vitscale ViT vs transformers ViT (ratio > 1: vitscale faster)", title_justify="left")
    names = ("config", "batch", "dtype", "mode", "compile", "vitscale/s", "HF/s", "ratio",
             "vitscale ms", "HF ms") + (("vitscale MFU", "HF MFU") if with_mfu else ())
    for name in names:
        t.add_column(name, justify="left" if name in ("config", "dtype", "mode", "compile") else "right")
    for c in cells:
        a, b = c["vitscale"], c["hf"]
        row = [c["config"], str(c["batch"]), c["dtype"], c["mode"], c["compile"],
               f"{a['samples_per_s']:.1f}", f"{b['samples_per_s']:.1f}", f"{c['ratio']:.2f}x",
               f"{a['ms_per_step']:.1f}", f"{b['ms_per_step']:.1f}"]
        if with_mfu:
            row += ["-" if m["mfu"] is None else f"{m['mfu']:.1%}" for m in (a, b)]
        t.add_row(*row)
    return t


def kind(device: str) -> str:
    """SETTINGS' key for a device type: cpu, or gpu for cuda and mps."""
    return "cpu" if device == "cpu" else "gpu"


def chosen(text: str, device: str) -> tuple[Setting, ...]:
    """--models 'S/16:8,pico/4:64': those presets at those batches, timed as the device's first
    default setting is."""
    timing = SETTINGS[kind(device)][0]
    out = []
    for item in text.split(","):
        name, _, batch = item.strip().partition(":")
        if not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--models: {item!r} is not PRESET:BATCH (e.g. S/16:8)")
        out.append(replace(timing, preset=name, batch=int(batch)))
    return tuple(out)


def with_overrides(settings: tuple[Setting, ...], args: argparse.Namespace) -> list[Setting]:
    """The settings with --warmup / --iters / --rounds applied where given."""
    return [Setting(s.preset, s.batch,
                    s.warmup if args.warmup is None else args.warmup,
                    s.iters if args.iters is None else args.iters,
                    s.rounds if args.rounds is None else args.rounds) for s in settings]


def listed(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated list of `allowed` names, in the order given."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {','.join(allowed)}")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = bench_common.parser(__doc__)
    p.add_argument("--warmup", type=int, help="untimed steps per round (default: per config)")
    p.add_argument("--iters", type=int, help="timed steps per round (default: per config)")
    p.add_argument("--dtype", type=listed(tuple(DTYPES)), default=("fp32", "bf16"),
                   help="comma-separated dtypes to time (default: fp32,bf16)")
    p.add_argument("--modes", type=listed(MODES), default=MODES,
                   help="comma-separated modes to time: infer, train or infer,train (default both)")
    p.add_argument("--compile", type=listed(COMPILE),
                   help="off, on or off,on: time eager and/or torch.compile'd models (default: off,on "
                        "on a GPU, off on a CPU, where inductor's C++ compilation takes minutes)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for --compile on (default: inductor)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense peak for the dtype, for MFU (0 = vitscale.cost.mfu's table for "
                        "known GPUs; none on a CPU unless given)")
    p.add_argument("--models", help="comma-separated PRESET:BATCH to time instead of the device's "
                   "defaults (e.g. S/16:8,pico/4:64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compile = args.compile or (COMPILE if device.type == "cuda" else ("off",))
    env = bench_common.environment(device)
    print(bench_common.environment_line(env), flush=True)
    cells = []
    settings = QUICK if args.quick else SETTINGS[kind(device.type)]
    settings = chosen(args.models, device.type) if args.models else settings
    for s in with_overrides(settings, args):
        cells += run_setting(s, device, args)
        torch._dynamo.reset()  # the next config compiles afresh, and this one's graphs are freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    console().print(results_table(cells))
    for line in speedups(cells):
        print(line)
    bench_common.write_json(args.json, env | {"cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
