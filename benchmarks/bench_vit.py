"""vitscale's ViT against Hugging Face transformers' ViT of exactly the same shape, in one run.

Each cell (config x dtype x mode) builds ViT(cfg) and a transformers
ViTForImageClassification with the same width, depth, heads, MLP, patch, image size and
classes (SDPA attention, no dropout, exact GELU, LayerNorm eps 1e-6; no pooler, so the
parameter counts must be equal, and are asserted to be). Both take the same random
input and are timed with vitscale.bench.measure_model in alternating rounds (ours then
HF, then HF then ours, ...) so that load from other processes on a shared machine hits
both sides alike; each side keeps its best round (a round's figure is its median step).
Best-of is the figure to trust on a shared machine: contention only ever slows a step.

Read the ratio as vitscale samples/s over HF samples/s: above 1.00x vitscale is faster,
below it is slower. The architectures compute the same function; vitscale fuses q, k, v
into one matmul where HF runs three, so differences are kernel- and launch-level.

    python benchmarks/bench_vit.py                 # S/16 (224 px, b32) and pico/4 (32 px, b64)
    python benchmarks/bench_vit.py --quick         # pico/4 only, a few seconds
    python benchmarks/bench_vit.py --device cuda --json out/bench_vit.json

Runtime: about 4 minutes on an idle 2-core CPU with the defaults (steps run up to 3x longer
when other jobs share the cores); well under one on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import torch  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from vitscale.bench import Measurement, example_input, measure_model, pick_device  # noqa: E402
from vitscale.models.vit import ViT, ViTConfig, param_count, preset  # noqa: E402
from vitscale.report import console  # noqa: E402

DTYPES = ("fp32", "bf16")
MODES = ("infer", "train")


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
SETTINGS = (Setting("S/16", 32, 1, 1, 4), Setting("pico/4", 64, 3, 1, 40))
QUICK = (Setting("pico/4", 64, 1, 1, 8),)


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


def round_warmup(s: Setting, r: int, mode: str) -> int:
    """Untimed steps before round r: all of them first, then one per train round (its fresh AdamW)."""
    if r == 0:
        return s.warmup
    return min(s.warmup, 1) if mode == "train" else 0  # AdamW allocates its state on its first step


def time_cell(ours: nn.Module, peer: nn.Module, x: torch.Tensor, mode: str, dtype: str,
              s: Setting) -> tuple[Measurement, Measurement]:
    """Best-of-rounds measurement of each side, alternating which goes first every round."""
    sides = {"ours": (ours, None), "peer": (peer, hf_loss)}
    runs: dict[str, list[Measurement]] = {"ours": [], "peer": []}
    for r in range(s.rounds):
        for name in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            model, loss_fn = sides[name]
            warmup = round_warmup(s, r, mode)
            runs[name].append(measure_model(model, x, mode, dtype, warmup, s.iters, loss_fn))
    return best(runs["ours"]), best(runs["peer"])


def summary(cell: dict) -> str:
    """One greppable line: 'S/16 b32 fp32 train: vitscale 12.3/s  hf 11.9/s  ratio 1.03x'."""
    return (f"{cell['config']} b{cell['batch']} {cell['dtype']} {cell['mode']}: "
            f"vitscale {cell['vitscale']['samples_per_s']:.1f}/s  hf {cell['hf']['samples_per_s']:.1f}/s  "
            f"ratio {cell['ratio']:.2f}x")


def run_setting(s: Setting, device: torch.device, seed: int) -> list[dict]:
    """All dtype x mode cells of one config; prints each summary line as it finishes."""
    cfg = preset(s.preset)
    ours, peer, params = build_pair(cfg, device, seed)
    print(f"{s.preset}: {params:,} parameters on both sides (vitscale == HF)", flush=True)
    torch.manual_seed(seed)
    x = example_input(cfg, s.batch, device)
    cells = []
    for dtype in DTYPES:
        for mode in MODES:
            m_ours, m_peer = time_cell(ours, peer, x, mode, dtype, s)
            cells.append({
                "config": s.preset, "batch": s.batch, "dtype": dtype, "mode": mode, "params": params,
                "vitscale": m_ours.as_dict(), "hf": m_peer.as_dict(),
                "ratio": m_ours.samples_per_s / m_peer.samples_per_s,
            })
            print(summary(cells[-1]), flush=True)
    return cells


def results_table(cells: list[dict]) -> Table:
    """Rich table of the cells: throughput of each side and the ratio."""
    t = Table(title="vitscale ViT vs transformers ViT (ratio > 1: vitscale faster)", title_justify="left")
    for name in ("config", "batch", "dtype", "mode", "vitscale/s", "HF/s", "ratio",
                 "vitscale ms", "HF ms"):
        t.add_column(name, justify="left" if name in ("config", "dtype", "mode") else "right")
    for c in cells:
        a, b = c["vitscale"], c["hf"]
        t.add_row(c["config"], str(c["batch"]), c["dtype"], c["mode"],
                  f"{a['samples_per_s']:.1f}", f"{b['samples_per_s']:.1f}", f"{c['ratio']:.2f}x",
                  f"{a['ms_per_step']:.1f}", f"{b['ms_per_step']:.1f}")
    return t


def with_overrides(settings: tuple[Setting, ...], args: argparse.Namespace) -> list[Setting]:
    """The settings with --warmup / --iters / --rounds applied where given."""
    return [Setting(s.preset, s.batch,
                    s.warmup if args.warmup is None else args.warmup,
                    s.iters if args.iters is None else args.iters,
                    s.rounds if args.rounds is None else args.rounds) for s in settings]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = bench_common.parser(__doc__)
    p.add_argument("--warmup", type=int, help="untimed steps per round (default: per config)")
    p.add_argument("--iters", type=int, help="timed steps per round (default: per config)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    env = bench_common.environment(device)
    print(bench_common.environment_line(env), flush=True)
    cells = []
    for s in with_overrides(QUICK if args.quick else SETTINGS, args):
        cells += run_setting(s, device, args.seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    console().print(results_table(cells))
    bench_common.write_json(args.json, env | {"cells": cells})
    return 0


if __name__ == "__main__":
    sys.exit(main())
