"""MAE's efficiency, measured: the encoder on visible tokens only vs on all tokens, and vs HF.

Two cells, each timing a pre-training train step (forward, backward, AdamW) of three models
with vitscale.cost.measure.measure_model in rotating rounds (each side keeps its best round):

  visible  vitscale MAE: the encoder runs on the visible tokens only (the paper's design)
  all      the same weights with MAEConfig(encoder_on_all_tokens=True): a mask token replaces
           each masked patch and the encoder runs on all N tokens (MAE Table 2, "w/ [M]")
  hf       transformers ViTMAEForPreTraining / VideoMAEForPreTraining of the same shape:
           same widths, depths, heads, MLP, mask ratio, norm-pix loss, SDPA attention

  mae       image, 75% random masking, 8-block 512-wide decoder with 16 heads (MAE)
  videomae  video, 90% tube masking, 4-block 384-wide decoder with 6 heads (VideoMAE ViT-B),
            no cls token

It prints one greppable line per comparison, e.g.
    mae B/16 75% visible-only vs all-tokens: 12.1/s vs 3.9/s = 3.10x
and, for reference, the ratio of forward multiply-adds (FlopCounterMode on the real models),
the bound the wall-clock ratio approaches when matmuls dominate. Both cells use the papers'
shapes: MAE's 2.8x is for ViT-L/16 (flops ratio 3.2x; at B/16 the 8-block decoder is a larger
share and the bound is 2.3x), VideoMAE's for B/16 on 16 x 224 x 224 clips (1568 tokens).

Parameter counts are asserted: HF ViTMAE stores its fixed sin-cos tables as frozen
Parameters where vitscale uses buffers, so only trainable counts are equal; HF VideoMAE's
encoder-to-decoder linear has no bias (as the VideoMAE repo), so vitscale has decoder_width
more. Targets: the norm-pix target is normalised over the whole patch in vitscale and HF
ViTMAE (as MAE), per channel in HF VideoMAE (as VideoMAE); the cost is the same.

    python benchmarks/bench_mae.py                  # CPU: L/16 224 px b2, B/16-f16 224 px b1
    python benchmarks/bench_mae.py --quick          # pico models, a smoke test in seconds
    python benchmarks/bench_mae.py --device cuda --json out/bench_mae.json   # L/16, B/16-f16

With --dual it times VideoMAE V2's dual masking instead: the same VideoMAE model (90% tube
masking) with the decoder on every masked token (`full`, decoder_mask_ratio 0) and on the
visible tokens plus 1 - r of the masked ones (`dual`, running cell, r = --decoder-mask-ratio,
default 0.5), same weights, rotating rounds, printing e.g.
  videomae B/16-f16 90% tube dual (decoder drops 50%, running_cell) vs full decoder: 0.13/s vs 0.13/s = 1.02x
and the forward multiply-adds of both (B/16-f16: 27.5 G vs 22.1 G, 1.24x). About 3 minutes on
a 2-core CPU (B/16-f16, b1), 2 with --small.

    python benchmarks/bench_mae.py --dual           # B/16-f16 16x224x224 (b8 on GPU, b1 on CPU)
    python benchmarks/bench_mae.py --dual --small   # S/16 on 8x224x224 clips, b1: minutes on a CPU

Runtime: about 9 minutes on a 2-core CPU with the defaults (longer on one busy with other jobs).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vitscale.common.device import pick_device  # noqa: E402
from vitscale.cost.measure import Measurement, example_input, measure_model  # noqa: E402
from vitscale.models.mae import MAE, MAEConfig, tube_masking  # noqa: E402
from vitscale.models.presets import preset  # noqa: E402
from vitscale.models.vit import ViTConfig  # noqa: E402

SIDES = ("visible", "all", "hf")


@dataclass(frozen=True)
class Cell:
    """One model shape to compare and how long to time it."""

    name: str  # "mae" (image) or "videomae"
    preset: str  # vitscale preset of the encoder
    mae: MAEConfig  # masking and decoder
    batch: int  # samples per step
    warmup: int = 1  # untimed steps per round (the first also allocates AdamW state)
    iters: int = 2  # timed steps per round; the round reports their median
    rounds: int = 3  # rotating rounds per side; each side keeps its best
    overrides: dict = field(default_factory=dict)  # ViTConfig fields changed from the preset

    def encoder_cfg(self) -> ViTConfig:
        image = dict(pos_embed="sincos", num_classes=0)  # MAE: fixed sin-cos, cls token
        video = dict(pos_embed="sincos", num_classes=0, class_token=False, pool="mean", qkv_bias=False)
        return preset(self.preset, **((video if self.name == "videomae" else image) | self.overrides))

    def label(self) -> str:
        cfg = self.encoder_cfg()
        size = "" if cfg.hw == (224, 224) else f" {cfg.hw[0]}px"
        tube = " tube" if self.mae.masking == "tube" else ""
        return f"{self.name} {self.preset}{size} {self.mae.mask_ratio:.0%}{tube}"


MAE_DECODER = dict(decoder_width=512, decoder_depth=8, decoder_heads=16)  # MAE
VIDEOMAE_DECODER = dict(decoder_width=384, decoder_depth=4, decoder_heads=6)  # VideoMAE ViT-B
CPU_CELLS = (  # the papers' shapes (MAE's 2.8x is ViT-L; VideoMAE's is B/16, 16 x 224 x 224), small batches
    Cell("mae", "L/16", MAEConfig(0.75, "random", **MAE_DECODER), batch=2),
    Cell("videomae", "B/16-f16", MAEConfig(0.9, "tube", **VIDEOMAE_DECODER), batch=1),
)
GPU_CELLS = (
    Cell("mae", "L/16", MAEConfig(0.75, "random", **MAE_DECODER), batch=32, warmup=3, iters=10, rounds=3),
    Cell("videomae", "B/16-f16", MAEConfig(0.9, "tube", **VIDEOMAE_DECODER), batch=8, warmup=3, iters=10,
         rounds=3),
)
QUICK_CELLS = (
    Cell("mae", "pico/4", MAEConfig(0.75, "random", 64, 2, 4), batch=16, rounds=2),
    Cell("videomae", "pico/4-f8", MAEConfig(0.9, "tube", 64, 2, 4), batch=4, rounds=2),
)


VIDEOMAE_S_DECODER = dict(decoder_width=192, decoder_depth=4, decoder_heads=3)  # VideoMAE ViT-S
TUBE = MAEConfig(0.9, "tube", **VIDEOMAE_DECODER)
DUAL_CELLS = {  # --dual: (default, --small), by device
    "cuda": (Cell("videomae", "B/16-f16", TUBE, batch=8, warmup=3, iters=10, rounds=3),
             Cell("videomae", "S/16-f8", MAEConfig(0.9, "tube", **VIDEOMAE_S_DECODER), batch=8, warmup=3,
                  iters=10, rounds=3)),
    "cpu": (Cell("videomae", "B/16-f16", TUBE, batch=1),
            Cell("videomae", "S/16-f8", MAEConfig(0.9, "tube", **VIDEOMAE_S_DECODER), batch=1)),
}
DUAL_QUICK = Cell("videomae", "pico/4-f8", MAEConfig(0.9, "tube", 64, 2, 4), batch=4, rounds=2)
DUAL_SIDES = ("full", "dual")


# ----------------------------------------------------------------------------- peers
def hf_config(cfg: ViTConfig, mae: MAEConfig) -> dict:
    """Fields shared by transformers' ViTMAEConfig and VideoMAEConfig for this shape."""
    return dict(
        hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_hidden, image_size=cfg.hw[0], patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        decoder_hidden_size=mae.decoder_width, decoder_num_hidden_layers=mae.decoder_depth,
        decoder_num_attention_heads=mae.decoder_heads,
        decoder_intermediate_size=int(mae.decoder_width * cfg.mlp_ratio),
        norm_pix_loss=mae.norm_pix_loss, attn_implementation="sdpa",
    )


class HFVideoMAE(nn.Module):
    """VideoMAEForPreTraining with a fresh tube mask each step, as vitscale masks.

    Takes HF's layout [B, T, C, H, W] (built once, outside the timed steps).
    """

    def __init__(self, model: nn.Module, cfg: ViTConfig, ratio: float):
        super().__init__()
        self.model, self.grid, self.ratio = model, cfg.grid, ratio

    def forward(self, x: torch.Tensor):
        mask = tube_masking(x.shape[0], self.grid, self.ratio, device=x.device).mask.bool()  # [B, N]
        return self.model(x, bool_masked_pos=mask)


def hf_peer(cell: Cell) -> nn.Module:
    """The transformers model of the cell's shape, SDPA attention."""
    tf, cfg = bench_common.transformers(), cell.encoder_cfg()
    if cell.name == "mae":
        if cfg.image_size != cfg.hw[0] or cfg.is_video or not cfg.class_token:
            raise ValueError("the HF ViTMAE peer needs a square image model with a cls token")
        model = tf.ViTMAEForPreTraining(tf.ViTMAEConfig(
            **hf_config(cfg, cell.mae), qkv_bias=cfg.qkv_bias, mask_ratio=cell.mae.mask_ratio))
    else:
        if cfg.class_token or cell.mae.masking != "tube":
            raise ValueError("the HF VideoMAE peer has no cls token and takes a tube mask")
        model = tf.VideoMAEForPreTraining(tf.VideoMAEConfig(
            **hf_config(cfg, cell.mae), num_frames=cfg.frames, tubelet_size=cfg.tubelet,
            qv_bias=cfg.qkv_bias, use_mean_pooling=False))  # False: a final encoder norm, as ours
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model if cell.name == "mae" else HFVideoMAE(model, cfg, cell.mae.mask_ratio)


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def check_params(cell: Cell, ours: nn.Module, peer: nn.Module) -> str:
    """Assert the parameter counts agree up to the known differences; describe them."""
    cfg, mae = cell.encoder_cfg(), cell.mae
    n_ours, n_peer, n_peer_train = count(ours), count(peer), count(peer, trainable=True)
    assert n_ours == count(ours, trainable=True)
    if cell.name == "mae":
        frozen = (cfg.num_patches + 1) * (cfg.width + mae.decoder_width)  # HF's sin-cos Parameters
        assert n_peer_train == n_ours and n_peer - n_peer_train == frozen, (n_ours, n_peer, n_peer_train)
        return f"{n_ours:,} trainable parameters on both sides (HF adds {frozen:,} frozen sin-cos)"
    assert n_peer == n_peer_train and n_ours - n_peer == mae.decoder_width, (n_ours, n_peer)
    return f"{n_ours:,} parameters (HF VideoMAE {n_peer:,}: no bias on encoder_to_decoder)"


# ----------------------------------------------------------------------------- timing
def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward pass on one sample (PyTorch's FlopCounterMode / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x[:1])
    return counter.get_total_flops() // 2


def best(ms: list[Measurement]) -> Measurement:
    """The round with the highest throughput."""
    return max(ms, key=lambda m: m.samples_per_s)


def line(label: str, what: str, a: Measurement, b: Measurement) -> str:
    """'mae B/16 75% visible-only vs all-tokens: 12.1/s vs 3.9/s = 3.10x'."""
    return f"{label} {what}: {a.samples_per_s:.2f}/s vs {b.samples_per_s:.2f}/s = " \
           f"{a.samples_per_s / b.samples_per_s:.2f}x"


def run_cell(cell: Cell, device: torch.device, seed: int, dtype: str = "fp32") -> dict:
    """Build the three models, time them in rotating order, print the comparison lines."""
    cfg = cell.encoder_cfg()
    torch.manual_seed(seed)
    visible = MAE(cfg, cell.mae).to(device)
    every = MAE(cfg, replace(cell.mae, encoder_on_all_tokens=True)).to(device)
    shared = {k: v for k, v in visible.state_dict().items() if k != "mask_token"}
    every.load_state_dict(shared, strict=False)  # the same weights; its mask token has width D
    torch.manual_seed(seed)
    peer = hf_peer(cell).to(device)
    label = cell.label()
    n, k = cfg.num_patches, int((1 - visible.make_mask(1, cfg.grid, device).mask).sum())  # visible
    if cell.name == "mae":  # HF keeps int(N * (1 - ratio)) tokens: the same count here
        assert int(n * (1 - cell.mae.mask_ratio)) == k, "HF ViTMAE would keep a different count"
    print(f"{label}: encoder {cfg.width}x{cfg.depth} ({cfg.heads} heads), grid {cfg.grid} = {n} tokens, "
          f"{k} visible; decoder {cell.mae.decoder_width}x{cell.mae.decoder_depth} "
          f"({cell.mae.decoder_heads} heads); batch {cell.batch}; {check_params(cell, visible, peer)}",
          flush=True)
    torch.manual_seed(seed)
    x = example_input(cfg, cell.batch, device)
    x_hf = x.transpose(1, 2).contiguous() if cfg.is_video else x  # HF video layout [B, T, C, H, W]
    ours_loss, hf_loss = (lambda out: out[0]), (lambda out: out.loss)  # (loss, pred, mask) / HF output
    sides = {"visible": (visible, x, ours_loss), "all": (every, x, ours_loss), "hf": (peer, x_hf, hf_loss)}
    flops = {name: forward_flops(model, inp) for name, (model, inp, _) in sides.items()}
    runs: dict[str, list[Measurement]] = {name: [] for name in SIDES}
    for r in range(cell.rounds):
        for name in SIDES[r % 3:] + SIDES[: r % 3]:  # rotate who goes first
            model, inp, loss_fn = sides[name]
            runs[name].append(measure_model(model, inp, "train", dtype, cell.warmup, cell.iters, loss_fn))
    m = {name: best(runs[name]) for name in SIDES}
    print(f"{label} forward multiply-adds per sample: visible {flops['visible'] / 1e9:.3g} G, "
          f"all-tokens {flops['all'] / 1e9:.3g} G ({flops['all'] / flops['visible']:.2f}x), "
          f"HF {flops['hf'] / 1e9:.3g} G", flush=True)
    peer_name = "HF ViTMAE" if cell.name == "mae" else "HF VideoMAE"
    print(line(label, "visible-only vs all-tokens", m["visible"], m["all"]), flush=True)
    print(line(label, f"vitscale vs {peer_name}", m["visible"], m["hf"]), flush=True)
    return {
        "cell": label, "preset": cell.preset, "batch": cell.batch, "dtype": dtype, "mae": asdict(cell.mae),
        "encoder": asdict(cfg), "tokens": n, "visible": k, "forward_macs": flops,
        "sides": {name: m[name].as_dict() for name in SIDES},
        "rounds": {name: [r.as_dict() for r in runs[name]] for name in SIDES},
        "ratio_visible_vs_all": m["visible"].samples_per_s / m["all"].samples_per_s,
        "ratio_vs_hf": m["visible"].samples_per_s / m["hf"].samples_per_s,
    }


def run_dual(cell: Cell, device: torch.device, seed: int, dtype: str = "fp32", ratio: float = 0.5,
             how: str = "running_cell") -> dict:
    """Time a VideoMAE step with the decoder on all masked tokens and under dual masking."""
    cfg = cell.encoder_cfg()
    torch.manual_seed(seed)
    full = MAE(cfg, cell.mae).to(device)
    dual = MAE(cfg, replace(cell.mae, decoder_mask_ratio=ratio, decoder_masking=how)).to(device)
    dual.load_state_dict(full.state_dict())  # the same weights
    label = f"{cell.label()} dual (decoder drops {ratio:.0%}, {how})"
    masking = full.make_mask(1, cfg.grid, device)
    n, k = cfg.num_patches, masking.keep.shape[1]
    decoded = dual.make_decoder_keep(masking.mask, cfg.grid).shape[1]
    mae = cell.mae
    print(f"{label}: encoder {cfg.width}x{cfg.depth} ({cfg.heads} heads), "
          f"{cfg.frames}x{cfg.hw[0]}x{cfg.hw[1]} clips, tubelet {cfg.tubelet}, grid {cfg.grid} = {n} tokens, "
          f"{k} visible; decoder {mae.decoder_width}x{mae.decoder_depth} ({mae.decoder_heads} heads) on {n} "
          f"tokens (full) vs {k + decoded} (dual: {decoded} of {n - k} masked); batch {cell.batch}, {dtype}, "
          f"warmup {cell.warmup}, {cell.iters} timed steps x {cell.rounds} rounds", flush=True)
    torch.manual_seed(seed)
    x = example_input(cfg, cell.batch, device)
    sides = {"full": full, "dual": dual}
    flops = {name: forward_flops(model, x) for name, model in sides.items()}
    runs: dict[str, list[Measurement]] = {name: [] for name in DUAL_SIDES}
    for r in range(cell.rounds):
        for name in DUAL_SIDES[r % 2:] + DUAL_SIDES[: r % 2]:  # rotate who goes first
            runs[name].append(measure_model(sides[name], x, "train", dtype, cell.warmup, cell.iters,
                                            lambda out: out[0]))
    m = {name: best(runs[name]) for name in DUAL_SIDES}
    print(f"{label} forward multiply-adds per sample: full {flops['full'] / 1e9:.3g} G, "
          f"dual {flops['dual'] / 1e9:.3g} G ({flops['full'] / flops['dual']:.2f}x)", flush=True)
    print(line(label, "vs full decoder", m["dual"], m["full"]), flush=True)
    return {
        "cell": label, "preset": cell.preset, "batch": cell.batch, "dtype": dtype, "mae": asdict(cell.mae),
        "decoder_mask_ratio": ratio, "decoder_masking": how, "encoder": asdict(cfg), "tokens": n,
        "visible": k, "decoded_masked": decoded, "forward_macs": flops,
        "sides": {name: m[name].as_dict() for name in DUAL_SIDES},
        "rounds": {name: [r.as_dict() for r in runs[name]] for name in DUAL_SIDES},
        "ratio_dual_vs_full": m["dual"].samples_per_s / m["full"].samples_per_s,
    }


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_common.parser(__doc__)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    p.add_argument("--dual", action="store_true", help="time VideoMAE V2 dual masking vs the full decoder")
    p.add_argument("--small", action="store_true", help="--dual on S/16 with 8-frame clips (CPU-sized)")
    p.add_argument("--batch", type=int, help="--dual: samples per step (default: per cell)")
    p.add_argument("--decoder-mask-ratio", type=float, default=0.5,
                   help="--dual: share of the masked tokens the decoder drops")
    p.add_argument("--decoder-masking", default="running_cell", choices=("running_cell", "random"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    env = bench_common.environment(device)
    print(f"{bench_common.environment_line(env)}  ({args.dtype} train steps: forward, backward, AdamW)",
          flush=True)
    if args.dual:
        kind = "cuda" if device.type == "cuda" else "cpu"
        cell = DUAL_QUICK if args.quick else DUAL_CELLS[kind][args.small]
        cell = replace(cell, rounds=args.rounds or cell.rounds, batch=args.batch or cell.batch)
        result = run_dual(cell, device, args.seed, args.dtype, args.decoder_mask_ratio, args.decoder_masking)
        bench_common.write_json(args.json, env | {"cells": [result]})
        return 0
    cells = QUICK_CELLS if args.quick else GPU_CELLS if device.type == "cuda" else CPU_CELLS
    results = []
    for cell in cells:
        if args.rounds:
            cell = replace(cell, rounds=args.rounds)
        results.append(run_cell(cell, device, args.seed, args.dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bench_common.write_json(args.json, env | {"cells": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
