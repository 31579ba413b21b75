"""One training loop for supervised training, MAE pre-training, fine-tuning and linear probing.

    config -> datasets -> task module -> optimizer -> [steps, evals, checkpoints] -> metrics

The loop is a pure function of the config and the checkpoint it resumes from: the data
order and every augmentation come from (seed, epoch, index), the LR from the step, and the
RNG state is saved with each checkpoint. On CPU a run killed at any point and resumed ends
with the same weights, bit for bit, as one that was never interrupted.

The loop is here, read top to bottom: `train` -> `Job.run` -> `train_epoch` -> `train_step`,
`end_epoch`. What a checkpoint holds, and every check a resume makes, is the Checkpointer's
(vitscale.train.checkpointer); how the module is spread over ranks is vitscale.train.parallel's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from vitscale import tasks, weights
from vitscale.common import checkpoint, classnames, dist, lock, logs, rundir, signals
from vitscale.common.device import autocast
from vitscale.common.errors import Interrupted, NotFinite, StopTraining, UserError
from vitscale.common.io import atomic_write_text
from vitscale.common.rng import rank_seed
from vitscale.cost import mfu
from vitscale.data import RunBatches, build_datasets, close, make_loader, skipped_files
from vitscale.data.sampler import EpochSampler
from vitscale.models.layers import checkpoint_blocks
from vitscale.tasks import evaluate
from vitscale.train import amp, optim, parallel
from vitscale.train.checkpointer import Checkpointer, prepare_run_dir
from vitscale.train.config import RunConfig
from vitscale.train.ema import EMA
from vitscale.train.flops import train_flops_per_sample
from vitscale.train.inputs import input_note, resolve, settle, trains_at
from vitscale.train.loggers import check as check_loggers
from vitscale.train.metrics import Metrics
from vitscale.train.steps import Plan, Shape, reshape

logger = logging.getLogger(__name__)


def _init_weights(module: torch.nn.Module, cfg: RunConfig, task: tasks.Task) -> None:
    """Start the encoder from --init weights in any format vitscale reads (vitscale.weights),
    then make the changes the task makes to them (fine-tuning: a tiny head, a fresh fc_norm)."""
    patterns = tuple(p.strip() for p in cfg.init_allow.split(",") if p.strip())
    report = weights.init_encoder(module.encoder, cfg.init, allow=patterns)
    logger.info(f"encoder weights from {cfg.init}: {report.summary()}")
    if task.after_init and (changed := task.after_init(module)):
        logger.info(f"{task.name}: " + "; ".join(changed))


def check_run_dir(cfg: RunConfig) -> Path:
    """Refuse, before anything is written, a --out that is no run directory (vitscale.common.rundir: the
    root, a home directory, a folder of other things) or that lies inside the run's own data."""
    rundir.check_outside(cfg.out, cfg.data)
    return rundir.check_out(cfg.out)


@dataclass(frozen=True)
class TrainResult:
    """What a run ends with, as its final.json holds it (`metrics` beside step and best)."""

    # the last evaluation (val_*, knn_*) and the final weights' test metrics (test_*), with
    # train.ema the moving average's beside them (ema_*); which ones depends on the task and data
    metrics: dict[str, float]
    # the optimizer step the run ended at
    step: int
    # the best validation score of the run (what best/ holds); None without validation data
    best: float | None


def train(cfg: RunConfig, d: dist.Dist | None = None) -> TrainResult:
    """Run (or resume) a training job; returns its final evaluation. `d`: the ranks it runs on
    (when not given, set up from train.device and torn down at the end). One process (rank 0
    for all ranks) holds the run directory's lock; a signal stops it at a checkpoint
    (Interrupted)."""
    own = d is None
    d = dist.setup(cfg.train.device) if own else d
    try:
        dist.on_main(d, lambda: check_run_dir(cfg))  # before the lock, the first thing written
        with logs.quiet(not d.main), lock.held(cfg.out, d, "run directory"), signals.deferred():
            return Job(cfg, d).run()
    except OSError as e:  # a full disk, wherever the run was writing (checkpoint, metrics, final.json)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StopTraining(f"no space left in {cfg.out} ({e.strerror}: {e.filename}); the last good "
                           f"checkpoint is {checkpoint.last_good(Path(cfg.out)) or 'none'}; free some space, "
                           "then run the same command again to resume") from None
    finally:
        if own:
            dist.teardown(d)


class Job:
    """One run: the data, the task module, its optimizer and where it has got to."""

    def __init__(self, cfg: RunConfig, d: dist.Dist):
        t = cfg.train
        check_loggers(t.loggers)  # a logger's missing package stops the run before any work
        if t.threads:
            torch.set_num_threads(t.threads)
        asked, cfg = cfg, settle(cfg)
        with warnings.catch_warnings(record=True) as said:  # what the data leaves out goes to the log
            warnings.simplefilter("always")
            self.train_set, self.val_set, self.test_set, self.info = build_datasets(cfg.data)
        cfg = resolve(cfg, info=self.info)
        logger.info(trains_at(cfg, self.info, (len(self.train_set), len(self.val_set), len(self.test_set))))
        if note := input_note(asked, cfg):
            logger.info(note)
        for w in said:
            logger.warning(str(w.message))
        if not len(self.val_set):
            logger.warning("no validation data (data.val_fraction=0): nothing is evaluated, best/ is the "
                           "latest checkpoint and final.json has no val_ metrics")
        self.cfg, self.d, self.task = cfg, d, tasks.get(cfg.task)
        self.task.check_data(self.info.num_classes)
        self.run_dir = prepare_run_dir(cfg, d)
        self.micro = t.batch // (d.world * t.accum)  # samples per rank per forward pass
        if self.micro * d.world * t.accum != t.batch:
            raise UserError(f"batch {t.batch} must be divisible by ranks x accum = {d.world * t.accum}")
        self.per_rank = len(EpochSampler(len(self.train_set), t.seed, 0, rank=d.rank, world=d.world))
        if self.per_rank < self.micro * t.accum:
            raise UserError(f"batch {t.batch} is larger than the training set ({len(self.train_set)}); "
                             "lower --train.batch")
        self._plans: dict = {}
        self.plan = self.plan_of(cfg)
        self.total = self.plan.total
        self.warmup = self.plan.warmup()  # in steps: the same for any run length
        self.peak = t.base_lr * t.batch / 256
        self.peak_tflops = mfu.peak_tflops(d.device, t.dtype, t.peak_tflops)  # None: no MFU (a CPU)
        self.macs = train_flops_per_sample(cfg, self.info.num_classes, self.plan.shares()) \
            if self.peak_tflops else 0.0  # per sample over the run's shapes, for MFU

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.module = tasks.build(cfg, self.info.num_classes)
        if t.act_ckpt:
            logger.info(f"activation checkpointing: {checkpoint_blocks(self.module)} transformer blocks")
        if cfg.init == "random":
            logger.info("encoder left at its random initialisation (--init random: a baseline)")
        elif cfg.init:
            _init_weights(self.module, cfg, self.task)
        torch.manual_seed(rank_seed(t.seed, d.rank))  # then each rank's own draws
        self.module.to(d.device)
        self.ema = EMA(self.module, t.ema) if t.ema else None  # from the initial weights, as they train
        self.forward = parallel.wrap(self.module, cfg, d)
        groups = optim.param_groups(self.module, t.weight_decay, t.layer_decay, cfg.model.depth)
        self.opt = optim.build(t.optimizer, groups, t.betas)
        self.scaler = amp.Scaler(t.dtype, d.device, sharded=t.fsdp)  # fp16's loss scale; else a plain step
        self.ckpt = Checkpointer(cfg, d, self.run_dir, module=self.module, opt=self.opt,
                                 scaler=self.scaler, ema=self.ema, n_train=len(self.train_set),
                                 plan_of=self.plan_of, lr=self.lr)
        self.step, self.best = 0, None
        self.stopped: str | None = None  # the signal that stopped training, once one has
        decay = (f"wsd decay from step {optim.decay_start(self.total, t.decay_frac)}" if t.schedule == "wsd"
                 else "cosine")
        logger.info(f"{cfg.task}: {sum(p.numel() for p in self.module.parameters()) / 1e6:.2f} M params on "
                    f"{d.device} x{d.world}; lr = base_lr {t.base_lr:g} x batch {t.batch} / 256 = "
                    f"{self.peak:.3g} (micro-batch {self.micro} x accum {t.accum} x ranks {d.world}); "
                    f"{self.total} steps, {self.warmup} warm-up, {decay}")
        if d.main and classnames.write(self.run_dir, self.info.class_names):  # for predict, eval, export
            logger.info(f"classes ({self.info.num_classes}): {classnames.shown(self.info.class_names)} "
                        f"({self.run_dir / classnames.FILE})" if self.info.class_names else
                        f"no classes (unlabelled data): {self.run_dir / classnames.FILE} is []")

    def plan_of(self, cfg: RunConfig) -> Plan:
        """The steps of a run of `cfg` on this job's data and ranks (plan.py), made once."""
        m, key = cfg.model, (cfg.train, cfg.model)
        if key not in self._plans:
            self._plans[key] = Plan(cfg.train, m.frames, m.hw[0], m.tubelet, m.patch_size, self.per_rank,
                                    self.micro * cfg.train.accum)
        return self._plans[key]

    def lr(self, step: int, cfg: RunConfig | None = None) -> float:
        """The LR of optimizer step `step` under this run's schedule (or under another run's `cfg`
        of the same data and batch: a branch's parent)."""
        t, plan = (cfg or self.cfg).train, self.plan if cfg is None else self.plan_of(cfg)
        peak = t.base_lr * t.batch / 256 * plan.shape(step).lr_mult
        return optim.lr_at(step, plan.total, plan.warmup(), peak, t.min_lr, t.schedule, t.decay_frac)

    def run(self) -> TrainResult:
        """Resume where the run directory says, train to the end (each epoch evaluated and
        checkpointed), test the final weights and write final.json."""
        self.step, self.best = self.ckpt.resume()
        if self.step >= self.total:
            return self.finished()
        metrics = Metrics(self.run_dir, self.d.main, self.step, self.cfg.train.loggers)
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=logs.console(), disable=not self.d.main)
        result: dict = {}
        with progress, contextlib.closing(metrics), self.batches() as batches:
            bar = progress.add_task(self.cfg.task, total=self.total, completed=self.step, info="")
            while self.step < self.total:
                window = self.train_epoch(batches, metrics, lambda info: progress.update(
                    bar, completed=self.step, info=info))
                if self.plan.ends_epoch(self.step):
                    result = self.end_epoch(window, metrics)
                if self.stopped and self.step < self.total:
                    raise self.interrupted(self.stopped)
        result |= self.test()
        if self.d.main:
            self.write_final(result)
        dist.barrier(self.d)  # ranks leave together: none tears down while rank 0 still writes
        return TrainResult(result, self.step, self.best)

    def write_final(self, result: dict) -> None:
        """final.json: the last evaluation (and the final weights' test metrics), at the step it was made."""
        if (self.run_dir / rundir.FINAL).is_dir():
            raise UserError(f"{self.run_dir / 'final.json'} is a directory, not vitscale's result file; "
                            "move it away and run the same command again")
        atomic_write_text(self.run_dir / rundir.FINAL,
                          json.dumps(result | {"step": self.step, "best": self.best}, indent=2))

    def finished(self) -> TrainResult:
        """A run at its end already: its final evaluation from final.json, or evaluated again (and
        best/ published if it is the best) where a kill came between the last checkpoint and
        final.json, or final.json was damaged."""
        done = _read_final(self.run_dir / rundir.FINAL, self.step)
        if done is not None:
            logger.info(f"{self.run_dir} finished before: " + ", ".join(f"{k} {done[k]:.4g}" for k in _SHOWN
                        if k in done))
            return TrainResult(done, self.step, self.best)
        result = self.evaluate(math.ceil(self.plan.epochs_done(self.step)))
        result |= self.test()
        if self.d.main:
            if self.task.score(result) in (None, self.best):  # the kill may have come before best/ too
                self.ckpt.publish_best(self.ckpt.at(self.step))
            self.write_final(result)
        return TrainResult(result, self.step, self.best)

    @contextlib.contextmanager
    def batches(self):
        """The training micro-batches from this step to the run's end, from one loader: its
        workers (data.workers) last the run and fetch an epoch's first batches while the one
        before ends and is evaluated; they are stopped when the run ends or stops."""
        t, d = self.cfg.train, self.d
        keys = RunBatches(self.plan, len(self.train_set), t.seed, self.step, self.total, self.micro, t.accum,
                          rank=d.rank, world=d.world, repeats=self.cfg.data.repeated_aug)
        batches = iter(make_loader(self.train_set, keys, self.micro, self.cfg.data.workers, d.device.type))
        try:
            yield batches
        finally:
            close(batches)

    def train_epoch(self, batches, metrics: Metrics, show) -> dict:
        """Optimizer steps (on micro-batches from `batches`) to the end of the current epoch (or of
        the run), or to the step a signal came in: then, mid-epoch, a checkpoint (all ranks stop at
        the same step)."""
        t, d = self.cfg.train, self.d
        epoch, end = self.plan.epoch(self.step), min(self.total, self.plan.epoch_end(self.step))
        self.forward.train()
        window = {"loss": 0.0, "n": 0, "samples": 0, "wait": 0.0, "time": 0.0}
        while self.step < end:
            t0 = time.perf_counter()
            lr = self.lr(self.step)
            optim.set_lr(self.opt, lr)
            shape = self.plan.shape(self.step)
            loss = self.train_step(batches, window, shape)
            self.step += 1
            window["time"] += time.perf_counter() - t0
            if loss is not None:  # None: not one file of the step's batch could be read
                window["loss"] += loss
                window["n"] += 1
                window["samples"] += t.batch * shape.mult
                rate, wait = window["samples"] / window["time"], window["wait"] / window["time"]
                util = mfu.mfu(rate / d.world, self.macs, self.peak_tflops)  # per device
                show(f"epoch {epoch + 1} loss {loss:.4f} lr {lr:.2e} {rate:.0f} samples/s "
                     + (f"MFU {util:.1%} " if util is not None else "") + f"data-wait {wait:.0%}")
                scale = {"loss_scale": self.scaler.scale} if self.scaler.enabled else {}  # fp16
                metrics.log({"step": self.step, "epoch": self.plan.epochs_done(self.step), "split": "train",
                             "loss": loss, "lr": lr} | scale)
            # mid-epoch checkpoints (end_epoch saves the step that ends an epoch or the run)
            every = t.ckpt_every and self.step % t.ckpt_every == 0
            stop = dist.any_rank(d, signals.received() is not None)
            if self.step < end and (every or self.step in t.keep_steps or stop):
                self.ckpt.save(self.step, self.best)
            if stop:
                self.stopped = signals.received() or "a signal to another rank"
                break
        return window

    def train_step(self, batches, window: dict, shape: Shape) -> float | None:
        """One optimizer step over `accum` micro-batches at the plan's `shape`; returns the mean
        loss over ranks, or None (and no update) when no file of any rank's micro-batches could be read."""
        t, d = self.cfg.train, self.d
        loss_sum, counted = torch.zeros((), device=d.device), 0  # counted: micro-batches with a readable file
        for micro_step in range(t.accum):
            tw = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - tw
            if batch["skipped"]:
                logger.info(f"step {self.step + 1}: {skipped_files(batch['skipped'])}")
            empty = not len(batch["y"])  # B = 0: the pass keeps ranks in step; it learns nothing
            x = batch["x"].to(d.device, non_blocking=True)
            y = batch["y"].to(d.device, non_blocking=True)
            x = reshape(x, shape.frames, shape.side)  # the data's shape unless the plan varies it
            with (parallel.no_sync(self.forward, micro_step == t.accum - 1), autocast(d.device, t.dtype),
                  evaluate.quiet(empty)):
                loss = self.forward(x, y)
            loss = loss.nan_to_num(0.0) if empty else loss  # a mean over no sample; zero gradient
            self.scaler.backward(loss / t.accum)
            loss_sum += loss.detach()
            counted += not empty
        both = torch.stack([loss_sum.float(), torch.tensor(float(counted), device=d.device)])
        loss_sum, counted = dist.mean(d, both).tolist()  # (their ratio is the mean over ranks)
        if not counted:
            self.opt.zero_grad(set_to_none=True)
            logger.info(f"step {self.step + 1}: no file of its batch could be read: no update")
            return None
        loss = loss_sum / counted
        if not math.isfinite(loss):
            raise NotFinite(f"loss is {loss} at step {self.step}; the last good checkpoint is "
                               f"{self.ckpt.last_good()}; "
                               "run the same command again with a lower --train.base_lr, "
                               "--train.clip_grad=1 or --train.dtype=fp32 to resume from it")
        # fp16: a step whose scaled gradients overflowed is skipped (its loss was finite) and the
        # scale halved; only a scale that keeps falling means the run is broken
        stepped = self.scaler.step(self.opt, self.module.parameters(), t.clip_grad)
        self.opt.zero_grad(set_to_none=True)
        if not stepped:
            logger.info(f"step {self.step + 1}: fp16 gradients overflowed; update skipped, loss scale now "
                        f"{self.scaler.scale:g}")
            if self.scaler.broken:
                raise StopTraining(f"fp16 gradients are not finite at any loss scale (down to "
                                   f"{self.scaler.scale:g}) at step {self.step}; the last good checkpoint is "
                                   f"{self.ckpt.last_good()}; run the same command again with "
                                   "--train.dtype=bf16 or fp32 (or a lower --train.base_lr) to resume "
                                   "from it")
            return loss
        if self.ema is not None:
            self.ema.update(self.module)
        return loss

    def interrupted(self, what: str) -> Interrupted:
        """What stops the run at its latest checkpoint (`what`: the signal, and where it came)."""
        latest = self.ckpt.latest()
        kept = f"checkpoint {latest}" if latest else "no checkpoint yet (it starts over)"
        return Interrupted(f"{what} at step {self.step} of {self.total}, {kept}; to resume, run the same "
                           f"command again (or vitscale train --config {self.run_dir / 'config.yaml'})")

    @contextlib.contextmanager
    def evaluating(self):
        """An evaluation a signal stops (at its next batch: evaluate.stop_if_signalled) stops the run
        at its latest checkpoint; on resume the steps after it are trained again."""
        try:
            yield
        except Interrupted as e:
            raise self.interrupted(str(e)) from None

    def evaluate(self, epoch: int) -> dict:
        """The trained weights' metrics after epoch `epoch` (1-based), and with train.ema the
        moving average's beside them, prefixed ema_ (ema_val_top1 ...)."""
        ctx = evaluate.Context(self.cfg, self.train_set, self.val_set, self.info, self.d,
                               self.run_dir / f"recon-epoch{epoch:03d}.png")
        with self.evaluating():
            with parallel.unsharded(self.module):
                result = evaluate.evaluate(self.task, self.module, ctx)
            if self.ema is not None:
                result |= evaluate.evaluate(self.task, self.ema.module, replace(ctx, picture=None),
                                            prefix="ema_")
        return result

    def test(self) -> dict:
        """The final weights' metrics on the test split, named test_* (with train.ema the moving
        average's too, ema_test_*): reported in final.json beside val's, never selected on."""
        ctx = evaluate.Context(self.cfg, self.train_set, self.val_set, self.info, self.d)
        with self.evaluating():
            with parallel.unsharded(self.module):
                result = evaluate.evaluate_test(self.task, self.module, ctx, self.test_set)
            if self.ema is not None:
                result |= evaluate.evaluate_test(self.task, self.ema.module, ctx, self.test_set,
                                                 prefix="ema_")
        if result:
            logger.info(f"test ({len(self.test_set)} items, final weights): "
                        + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def end_epoch(self, window: dict, metrics: Metrics) -> dict:
        """Evaluate, log, checkpoint, and publish the best checkpoint so far."""
        epoch = math.ceil(self.plan.epochs_done(self.step))
        result = self.evaluate(epoch)
        seconds = max(window["time"], 1e-9)
        row = {"step": self.step, "epoch": self.plan.epochs_done(self.step), "split": "val",
               "train_loss": window["loss"] / max(1, window["n"]),
               "samples_per_s": window["samples"] / seconds, "train_s": window["time"],
               "data_wait": window["wait"] / seconds} | result
        util = mfu.mfu(row["samples_per_s"] / self.d.world, self.macs, self.peak_tflops)
        row |= {"mfu": util} if util is not None else {}
        metrics.log(row)
        logger.info(f"epoch {epoch}: " + ", ".join(f"{k} {row[k]:.4g}" for k in _SHOWN if k in row))
        score = self.task.score(result)  # None without validation data: the latest is the best
        improved = score is None or self.best is None or score > self.best
        self.best = score if improved else self.best
        path = self.ckpt.save(self.step, self.best)
        if improved and self.d.main:
            self.ckpt.publish_best(path)
        return result


def _read_final(path: Path, step: int) -> dict | None:
    """The metrics final.json holds for optimizer step `step`, or None: missing, of another step,
    or damaged (then a warning names it)."""
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
        if not isinstance(done, dict) or not all(isinstance(v, (int, float)) for v in done.values()
                                                 if v is not None):
            raise ValueError("not a mapping of metrics")
    except (OSError, ValueError) as e:  # a cut or garbled file (JSONDecodeError, UnicodeDecodeError)
        logger.warning(f"{path} cannot be read ({e}); evaluating the last checkpoint again")
        return None
    return {k: v for k, v in done.items() if k not in ("step", "best")} if done.get("step") == step else None


_SHOWN = ("train_loss", "val_loss", "val_top1", "val_top5", "knn_top1", "ema_val_loss", "ema_val_top1",
          "ema_val_top5", "ema_knn_top1", "test_top1", "test_knn_top1", "ema_test_top1", "samples_per_s",
          "mfu", "data_wait")
