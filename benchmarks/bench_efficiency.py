"""Efficiency techniques, each against its plain baseline measured in the same run.

  multires  ResFormer: pico/4 on digits trained at side 32 and at sides 24,32,40 with the same
            training multiply-adds (FlopCounterMode, forward + backward: the multi-side run
            stops at the step where its total reaches the single-side run's), then the test
            top-1 of each run's best checkpoint with the test data made at sides 16 to 48;
            one line per side, and a plot (multires.png in --out) with the trained sides marked.
  s2        S² linear probes of frozen MAE encoders (pre-trained on digits, same recipe): pico/4
            at probe scales 1 and 1,2, and a wider pico/4 (vitscale.cost.scaling.scale, strategy w)
            of about the 1,2 probe's multiply-adds at scale 1; test and val top-1, multiply-adds
            per image of a probe training step.
  drop      token dropping after block 1 (EViT's cls-attention ranking by default): inference
            speed of S/16 at keep 1.0 / 0.7 / 0.5 against the plain model with the same weights
            (alternating rounds, each side's best), and accuracy when fine-tuning with dropping:
            one supervised pico/4 base on digits (keep 1.0; the multires section's single-side
            run when both run), fine-tuned from it at each keep with tokens dropped in training
            and evaluation.
  multigrid Multigrid training (Wu et al. 2020, train.multigrid=long,short) on moving digits
            (8 frames of 16 px, motion direction, pico/4-f8, batch 16): the plain run's final
            val top-1 is the target; multigrid runs of 1.5x and 3x its epochs, each with when
            it first reached the target (epoch, training multiply-adds, seconds in training
            steps) against the plain run's totals, and its CPU time.

Every run is one seed (--seed) on the built-in digits (179 test samples: about ± 1.5 points
near 95%) or moving digits (200 val clips: about ± 2.7 points near 80%); runs live in a
temporary directory removed at the end.

    python benchmarks/bench_efficiency.py                      # all sections
    python benchmarks/bench_efficiency.py --only multires,drop --out results/
    python benchmarks/bench_efficiency.py --quick              # 3 steps a run, small evaluation
                                                               # splits, pico/4 speed: seconds

Runtime: 15 minutes on a 2-core CPU beside other jobs with --threads 1 (multires 7.5, s2 6.0,
drop 1.7); PyTorch's two threads on cores others are using ran an epoch 7x slower.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

if importlib.util.find_spec("vitscale") is None:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common  # noqa: E402
import torch  # noqa: E402

from vitscale.common import records
from vitscale.common.device import pick_device  # noqa: E402
from vitscale.cost.complexity import cost  # noqa: E402
from vitscale.cost.measure import example_input, measure_model  # noqa: E402
from vitscale.cost.scaling import scale  # noqa: E402
from vitscale.data import build_datasets  # noqa: E402
from vitscale.data.multires import side_at  # noqa: E402
from vitscale.models.presets import preset  # noqa: E402
from vitscale.models.vit import ViT  # noqa: E402
from vitscale.runs.evaluate import evaluate_run  # noqa: E402
from vitscale.train import config, engine, inputs  # noqa: E402
from vitscale.train.config import RunConfig  # noqa: E402
from vitscale.train.flops import train_flops_per_sample  # noqa: E402
from vitscale.train.metrics import read_metrics  # noqa: E402
from vitscale.train.steps import Plan  # noqa: E402

KEEPS = (1.0, 0.7, 0.5)
CLASSES = 10  # digits


@dataclass(frozen=True)
class Lengths:
    """Epochs of each kind of run (the recipes' own are 40 / 60 / 30 / 20)."""

    train: int  # supervised from scratch: the single-side multires run and the token-drop base
    pretrain: int  # MAE pre-training of the S² encoders
    probe: int  # linear probes
    finetune: int  # token-drop fine-tunes
    video: int  # the plain moving-digits run of the multigrid section
    max_steps: int = 0  # stop every run after this many optimizer steps (0: all its epochs)


FULL = Lengths(train=40, pretrain=20, probe=15, finetune=10, video=20)
QUICK = Lengths(train=1, pretrain=1, probe=1, finetune=1, video=1, max_steps=3)
# --quick checks the plumbing, not accuracies: evaluation splits of 5% (and 400 moving-digits clips)
# instead of the 20% and 10% that cost most of a quick run's time.
QUICK_DATA = ["data.val_fraction=0.05", "data.test_fraction=0.05", "data.num_clips=400"]
VIDEO = ["model.frames=8", "model.tubelet=2", "data.name=moving-digits", "data.frames=8",
         "data.image_size=16", "data.label=direction", "train.batch=16"]


@dataclass(frozen=True)
class Run:
    dir: Path
    cfg: RunConfig
    result: dict  # final.json: the last evaluation and the final weights' test metrics
    steps: int  # optimizer steps taken
    cpu_s: float  # CPU seconds of the process while it trained (all threads; evaluation included)


@dataclass
class Bench:
    """What the sections share: options, lengths, the device, and the runs trained so far (a run
    asked for twice with the same recipe and overrides is trained once)."""

    args: object
    lengths: Lengths
    tmp: Path
    runs: dict = field(default_factory=dict)

    def train(self, command: str, name: str, overrides: list[str], init: str = "") -> Run:
        """A run of `vitscale <command>`'s recipe with these overrides, trained quietly."""
        key = (command, init, tuple(overrides))
        if key not in self.runs:
            out = self.tmp / f"{len(self.runs):02d}-{name}"
            a = self.args
            common = [f"train.threads={a.threads}", "train.knn_k=0", "train.ckpt_every=0",
                      "train.keep_last=1", f"train.seed={a.seed}", f"train.device={a.device}",
                      f"train.max_steps={self.lengths.max_steps}"]
            quick = QUICK_DATA if a.quick else []
            cfg = records.apply_overrides(config.recipe(command, init=init, out=str(out)),
                                          common + quick + overrides)
            cpu = time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):  # the progress bar
                result = engine.train(cfg).metrics
            steps = json.loads((out / "final.json").read_text())["step"]
            # the config with its input shape decided (a data.image_size of 0 is the model's)
            self.runs[key] = Run(out, inputs.settle(cfg), result, steps, time.process_time() - cpu)
        return self.runs[key]

    def test_top1(self, run: Run, side: int = 0) -> float:
        """Test top-1 of the run's best checkpoint, the data made at `side` (0: the trained one)."""
        with contextlib.redirect_stderr(io.StringIO()):
            return evaluate_run(str(run.dir), self.args.device, resolution=side)["test_top1"]


def flops_at(cfg: RunConfig, side: int) -> float:
    """Training multiply-adds per sample (forward + backward) of `cfg`'s task at input `side`."""
    return train_flops_per_sample(replace(cfg, model=cfg.model.replace(image_size=side)), CLASSES)


def matched_steps(sides: tuple[int, ...], seed: int, per_side: dict[int, float], budget: float) -> int:
    """Optimizer steps of a multi-side run (steps drawn by multires.side_at) whose summed
    per-sample multiply-adds come nearest `budget` (the same batch on both sides)."""
    total, step = 0.0, 0
    while True:
        nxt = total + per_side[side_at(sides, seed, step)]
        if nxt >= budget:
            return step + 1 if nxt - budget < budget - total else step
        total, step = nxt, step + 1


def multires_compute(sides: tuple[int, ...], seed: int, per_side: dict[int, float], steps: int) -> float:
    """Per-sample multiply-adds summed over a multi-side run's first `steps` steps."""
    return sum(per_side[side_at(sides, seed, s)] for s in range(steps))


# ----------------------------------------------------------------------------- sections
def multires(b: Bench) -> dict:
    args = b.args
    single = b.train("train", "base", [f"train.epochs={b.lengths.train}"])
    side = single.cfg.data.image_size
    per_side = {s: flops_at(single.cfg, s) for s in {side, *args.sides}}
    budget = single.steps * per_side[side]
    steps = matched_steps(args.sides, args.seed, per_side, budget)
    multi = b.train("train", "multires", [f"train.epochs={b.lengths.train}", f"train.max_steps={steps}",
                                          "train.resolutions=" + ",".join(map(str, args.sides))])
    spent = multires_compute(args.sides, args.seed, per_side, multi.steps)
    batch = single.cfg.train.batch
    names = {"single": f"side {side}", "multi": "sides " + ",".join(map(str, args.sides))}
    print(f"multires: pico/4 on digits, {names['single']} vs {names['multi']} at equal training "
          f"multiply-adds (FlopCounterMode, forward + backward, batch {batch}); test top-1 of the best "
          f"checkpoint by test side")
    print(f"  {names['single']:16s} {single.steps:5d} steps  {batch * budget:.3e} multiply-adds")
    print(f"  {names['multi']:16s} {multi.steps:5d} steps  {batch * spent:.3e} multiply-adds "
          f"({spent / budget:.3f}x)")
    rows = []
    for t in args.test_sides:
        a, m = b.test_top1(single, t), b.test_top1(multi, t)
        trained = "trained by both" if t == side else "trained by multi" if t in args.sides else "not trained"
        print(f"  test side {t:3d} px  single {100 * a:5.1f}%  multi {100 * m:5.1f}%  "
              f"({100 * (m - a):+5.1f} points; {trained})")
        rows.append(dict(side=t, single_top1=a, multi_top1=m))
    path = plot_multires(rows, {"single": (side,), "multi": args.sides}, names, b.args.out / "multires.png")
    print(f"  plot: {path}")
    return dict(single_steps=single.steps, multi_steps=multi.steps, single_flops=batch * budget,
                multi_flops=batch * spent, rows=rows, plot=str(path))


def plot_multires(rows: list[dict], trained: dict[str, tuple[int, ...]], names: dict[str, str],
                  path: Path) -> Path:
    """Test top-1 against test side, one line per recipe; filled markers at its trained sides."""
    from vitscale.common.figures import figure, save_figure  # matplotlib (Agg) only when a plot is made

    fig, ax = figure(figsize=(5.5, 3.6))
    sides = [r["side"] for r in rows]
    for (key, label), color, size in zip(names.items(), ("tab:blue", "tab:orange"), (9, 6), strict=True):
        acc = [100 * r[f"{key}_top1"] for r in rows]  # the later line's smaller markers leave both visible
        ax.plot(sides, acc, "o-", color=color, label=f"trained at {label}", markersize=size)
        for s, a in zip(sides, acc, strict=True):
            if s not in trained[key]:
                ax.plot(s, a, "o", color=color, markersize=size, markerfacecolor="white")
    ax.set_xlabel("test side (px)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_xticks(sides)
    ax.set_title("pico/4 on digits, equal training compute\n(filled: a side the run trained at)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def s2(b: Bench) -> dict:
    L = b.lengths
    pre = b.train("pretrain", "mae-pico", [f"train.epochs={L.pretrain}"])
    base = pre.cfg.model
    probes = {"1": [], "1,2": []}
    for scales in probes:
        for seed in b.args.probe_seeds:
            probes[scales].append(b.train("linprobe", f"probe-{scales}-{seed}", [
                f"train.epochs={L.probe}", f"train.probe_scales={scales}", f"train.seed={seed}"],
                init=str(pre.dir)))
    cost_of = {k: train_flops_per_sample(v[0].cfg, CLASSES) for k, v in probes.items()}
    wide = scale(base, "w", cost_of["1,2"] / cost_of["1"])
    shape = [f"model.width={wide.width}", f"model.heads={wide.heads}"]
    wide_pre = b.train("pretrain", "mae-wide", [f"train.epochs={L.pretrain}", *shape])
    wide_probes = [b.train("linprobe", f"probe-wide-{seed}", [
        f"train.epochs={L.probe}", "train.probe_scales=1", f"train.seed={seed}", *shape],
        init=str(wide_pre.dir)) for seed in b.args.probe_seeds]
    cost_of["wide"] = train_flops_per_sample(wide_probes[0].cfg, CLASSES)
    seeds = ",".join(map(str, b.args.probe_seeds))
    print(f"s2: linear probes ({L.probe} epochs, probe seeds {seeds}: their mean) of frozen MAE encoders "
          f"pre-trained {L.pretrain} epochs on digits; multiply-adds per image of a probe training step")
    rows = []
    for label, key, runs in ((f"pico/4 w{base.width} scales 1", "1", probes["1"]),
                             (f"pico/4 w{base.width} scales 1,2", "1,2", probes["1,2"]),
                             (f"w{wide.width} h{wide.heads} scales 1", "wide", wide_probes)):
        test = sum(b.test_top1(r) for r in runs) / len(runs)
        val = sum(r.result["val_top1"] for r in runs) / len(runs)
        print(f"  {label:22s} test {100 * test:5.1f}%  val {100 * val:5.1f}%  {cost_of[key] / 1e6:6.1f} M "
              f"multiply-adds ({cost_of[key] / cost_of['1']:.2f}x scales 1)")
        rows.append(dict(label=label, test_top1=test, val_top1=val, flops=cost_of[key]))
    return dict(rows=rows)


def drop(b: Bench) -> dict:
    return dict(speed=drop_speed(b), finetune=drop_finetune(b))


def drop_speed(b: Bench) -> list[dict]:
    """Inference of the same weights with and without dropping, alternating rounds."""
    args, device = b.args, pick_device(b.args.device)
    name = "pico/4" if args.quick else args.speed_preset
    base = preset(name)
    drop_after = max(1, base.depth // 4)  # EViT's first drop is after block 3 of DeiT-S's 12; one drop here
    configs = {"plain": base} | {
        f"keep {k}": base.replace(drop_after=drop_after, keep=k, drop_by=args.drop_by) for k in KEEPS}
    torch.manual_seed(args.seed)
    models = {label: ViT(cfg).to(device).eval() for label, cfg in configs.items()}
    for model in models.values():
        model.load_state_dict(models["plain"].state_dict())
    x = example_input(base, args.speed_batch, device)
    best: dict[str, float] = {}
    rounds = args.rounds or (2 if args.quick else 3)
    for r in range(rounds):
        for label in list(models) if r % 2 == 0 else list(reversed(models)):
            m = measure_model(models[label], x, mode="infer", warmup=1 if r == 0 else 0, iters=args.iters)
            best[label] = max(best.get(label, 0.0), m.samples_per_s)
    print(f"drop, speed: {name} {base.hw[0]} px, batch {args.speed_batch}, infer fp32 on {device}, drop "
          f"after block {drop_after} of {base.depth} by {args.drop_by}, best of {rounds} rounds x "
          f"{args.iters} steps")
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


def drop_finetune(b: Bench) -> list[dict]:
    """One supervised base at keep 1.0, fine-tuned (`finetune --init`) at each keep."""
    L, by = b.lengths, b.args.drop_by
    base = b.train("train", "base", [f"train.epochs={L.train}"])
    print(f"drop, fine-tuning: pico/4 on digits, a supervised base ({L.train} epochs, keep 1.0: test "
          f"top-1 {100 * b.test_top1(base):.1f}%) fine-tuned {L.finetune} epochs at each keep, tokens "
          f"dropped after block 1 of 4 by {by} in fine-tuning and evaluation")
    cells = []
    for k in KEEPS:
        run = b.train("finetune", f"keep{k}", [f"train.epochs={L.finetune}", "model.drop_after=1",
                                               f"model.keep={k}", f"model.drop_by={by}"], init=str(base.dir))
        test, flops = b.test_top1(run), cost(run.cfg.model).flops
        cells.append(dict(keep=k, test_top1=test, val_top1=run.result["val_top1"], flops=flops))
        print(f"  keep {k:.1f}  test {100 * test:5.1f}%  val {100 * run.result['val_top1']:5.1f}%  "
              f"{flops / 1e6:5.1f} M multiply-adds ({flops / cells[0]['flops']:.2f}x keep 1.0)")
    return cells


def multigrid(b: Bench) -> dict:
    plain = b.train("train", "video-plain", [f"train.epochs={b.lengths.video}", *VIDEO])
    target = plain.result["val_top1"]
    print(f"multigrid: pico/4-f8 on moving digits (8 frames x 16 px, direction), batch 16; target: the plain "
          f"{b.lengths.video}-epoch run's final val top-1 {100 * target:.1f}%; a multigrid run reaches it at "
          "the first epoch whose val top-1 is at least that")
    rows = []
    for label, factor in (("plain", 0), ("multigrid x1.5", 1.5), ("multigrid x3", 3.0)):
        epochs = max(1, round(factor * b.lengths.video))
        run = plain if not factor else b.train("train", f"multigrid-x{factor}", [
            f"train.epochs={epochs}", "train.multigrid=long,short", *VIDEO])
        row = progress(run, target) | {"label": label}
        rows.append(row)
        first, base = row["reached"], rows[0]
        where = ("does not reach it" if first is None else
                 f"reaches it at epoch {first['epoch']:.3g}: {first['flops'] / base['flops']:.2f}x the plain "
                 f"run's multiply-adds, {first['train_s'] / base['train_s']:.2f}x its training seconds")
        print(f"  {label:15s} {row['epochs']:3d} ep {row['steps']:5d} steps  "
              f"val {100 * row['val_top1']:5.1f}%  test {100 * row['test_top1']:5.1f}%  "
              f"{row['flops']:.3e} multiply-adds "
              f"({row['flops'] / base['flops']:.2f}x)  train {row['train_s']:5.1f} s  cpu {run.cpu_s:5.1f} s "
              f"({run.cpu_s / plain.cpu_s:.2f}x); " + (where if factor else "the target"))
    return dict(target=target, rows=rows)


def progress(run: Run, target: float) -> dict:
    """A run's totals (steps, training multiply-adds by its plan's shapes, seconds in training steps)
    and where its val top-1 first reached `target` (None if never)."""
    cfg = run.cfg
    train_set, _, _, info = build_datasets(cfg.data)
    plan = Plan(cfg.train, cfg.data.frames, cfg.data.image_size, cfg.model.tubelet, cfg.model.patch_size,
                len(train_set), cfg.train.batch)
    resolved = inputs.resolve(cfg, info)
    taken = plan.shapes[: run.steps]  # a run stopped by max_steps never met the later shapes
    per = {k: train_flops_per_sample(resolved, info.num_classes, {k: 1.0})
           for k in {(s.frames, s.side) for s in taken}}
    spent = [0.0, *itertools.accumulate(cfg.train.batch * s.mult * per[(s.frames, s.side)] for s in taken)]
    rows = [r for r in read_metrics(run.dir) if r["split"] == "val"]
    seconds = list(itertools.accumulate(r["train_s"] for r in rows))
    reached = next(({"epoch": r["epoch"], "flops": spent[r["step"]], "train_s": t}
                    for r, t in zip(rows, seconds, strict=True) if r["val_top1"] >= target), None)
    return dict(epochs=cfg.train.epochs, steps=run.steps, val_top1=run.result["val_top1"],
                test_top1=run.result["test_top1"], flops=spent[-1], train_s=seconds[-1], cpu_s=run.cpu_s,
                reached=reached)


# A section: a function of the Bench that prints its lines and returns what --json stores.
SECTIONS = {"multires": multires, "s2": s2, "drop": drop, "multigrid": multigrid}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def sections(text: str) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--only takes sections of {','.join(SECTIONS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> dict:
    p = bench_common.parser(__doc__)
    p.add_argument("--only", type=sections, default=list(SECTIONS), help=f"of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="where the plot goes (default: a new temporary directory)")
    p.add_argument("--sides", type=ints, default=(24, 32, 40), help="multires: the multi-side run's sides")
    p.add_argument("--test-sides", type=ints, default=(16, 24, 32, 40, 48), help="multires: sides tested")
    p.add_argument("--probe-seeds", type=ints, default=(0,), help="s2: probe seeds (their mean is printed)")
    p.add_argument("--speed-preset", default="S/16", help="drop: model timed (224 px presets)")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="drop: timed steps per round")
    p.add_argument("--drop-by", default="attention", choices=("attention", "random"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: PyTorch's default; 1 is faster on cores shared with others)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_efficiency-"))
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}  device {device} ({name})  threads {torch.get_num_threads()}",
          flush=True)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_efficiency-runs-") as tmp:
        b = Bench(args, QUICK if args.quick else FULL, Path(tmp))
        for section in args.only:
            start = time.perf_counter()
            out[section] = SECTIONS[section](b)
            print(f"  ({section}: {(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    bench_common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
