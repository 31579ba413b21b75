"""Token dropping (model.keep after block model.drop_after) against the plain ViT, in one run.

Speed: ViT(cfg) with keep 1.0, 0.7 and 0.5 (EViT's ranking by cls attention) and the plain
model, all with the same weights, timed on the same random input in alternating rounds (each
keeps its best round; a round's figure is its median step); GFLOPs are vitscale.complexity's
for one sample. keep=1.0 is the plain model bit for bit, so its ratio measures only noise.

Accuracy: pico/4 trained on digits from scratch at each keep ratio (the same epochs and seed,
tokens dropped in training and at evaluation, drop_by as --drop-by); val top-1 of each.

    python benchmarks/bench_token_drop.py                 # S/16 224 px b8 speed + pico/4 digits runs
    python benchmarks/bench_token_drop.py --quick         # pico/4 speed, tiny runs: seconds
    python benchmarks/bench_token_drop.py --no-accuracy   # speed only

Runtime: about 12 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import torch  # noqa: E402

from vitscale import config, engine  # noqa: E402
from vitscale.bench import example_input, measure_model, pick_device  # noqa: E402
from vitscale.complexity import cost  # noqa: E402
from vitscale.models.vit import ViT, preset  # noqa: E402

KEEPS = (1.0, 0.7, 0.5)


def speed(args, device: torch.device) -> list[dict]:
    name = "pico/4" if args.quick else args.preset
    base = preset(name)
    drop_after = max(1, base.depth // 4)  # EViT's first drop is after block 3 of DeiT-S's 12; one drop here
    configs = {"plain": base} | {
        f"keep {k}": base.replace(drop_after=drop_after, keep=k, drop_by=args.drop_by) for k in KEEPS}
    torch.manual_seed(args.seed)
    models = {label: ViT(cfg).to(device).eval() for label, cfg in configs.items()}
    for model in models.values():
        model.load_state_dict(models["plain"].state_dict())
    x = example_input(base, args.batch, device)
    best: dict[str, float] = {}
    rounds = args.rounds or (2 if args.quick else 3)
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for label in order:
            m = measure_model(models[label], x, mode="infer", warmup=1 if r == 0 else 0, iters=args.iters)
            best[label] = max(best.get(label, 0.0), m.samples_per_s)
    print(f"speed: {name} {base.hw[0]} px, batch {args.batch}, infer fp32, drop after block {drop_after} "
          f"of {base.depth} by {args.drop_by}, best of {rounds} rounds x {args.iters} steps")
    cells = []
    for label, cfg in configs.items():
        gflops = cost(cfg).gflops
        cell = dict(label=label, tokens_after=cfg.num_prefix + cfg.kept(cfg.num_patches),
                    samples_per_s=best[label], gflops=gflops,
                    speedup=best[label] / best["plain"], flops_ratio=gflops / cost(base).gflops)
        print(f"  {label:9s} tokens {cell['tokens_after']:4d}  {cell['samples_per_s']:8.1f} samples/s "
              f"({cell['speedup']:.2f}x plain)  {gflops:7.3f} GFLOPs ({cell['flops_ratio']:.2f}x plain)")
        cells.append(cell)
    return cells


def accuracy(args) -> list[dict]:
    epochs = 1 if args.quick else args.epochs
    fast = ["train.threads=0", "train.knn_k=0", "train.ckpt_every=0", f"train.seed={args.seed}",
            "train.device=cpu", f"train.epochs={epochs}"]
    print(f"accuracy: pico/4 on digits, trained from scratch {epochs} epochs at each keep, the same "
          f"steps and seed (drop after block 1 of 4 by {args.drop_by}, in training and at eval)")
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in KEEPS:
            cfg = config.apply_overrides(config.RunConfig(out=f"{tmp}/keep{k}"), fast + [
                "model.drop_after=1", f"model.keep={k}", f"model.drop_by={args.drop_by}"])
            result = engine.train(cfg, log=lambda *a, **kw: None)
            cells.append(dict(keep=k, val_top1=result["val_top1"], gflops=cost(cfg.model).gflops))
            mflops = cells[-1]["gflops"] * 1e3
            print(f"  keep {k:.1f}  val top-1 {result['val_top1']:.3f}  {mflops:.2f} MFLOPs")
    return cells


def main() -> None:
    p = bench_common.parser(__doc__)
    p.add_argument("--preset", default="S/16", help="model timed for speed (224 px presets)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed steps per round")
    p.add_argument("--drop-by", default="attention", choices=("attention", "random"))
    p.add_argument("--no-accuracy", action="store_true", help="speed only")
    p.add_argument("--epochs", type=int, default=20, help="digits training epochs at each keep ratio")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"torch {torch.__version__}  device {device}  threads {torch.get_num_threads()}")
    out = {"speed": speed(args, device)}
    if not args.no_accuracy:
        out["accuracy"] = accuracy(args)
    bench_common.write_json(args.json, out)


if __name__ == "__main__":
    main()
