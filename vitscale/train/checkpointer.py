"""A run's checkpoints from the engine's side: what it saves, what it resumes from, and what a
resume must check first.

The engine's loop asks two things of a `Checkpointer`: `resume()` (where the run has got to) and
`save(step, best)`. Everything a checkpoint holds of the run (the module, the optimizer, the
EMA weights, the fp16 loss scale, every rank's RNG state) is the checkpointer's to gather and
set back, and every check a resume makes is here:

- the run directory holds this run, or one that differs only in what a stopped run may change
  (`prepare_run_dir`: RECOVERY, PARALLELISM);
- a branch (train.branch_from) continues its parent: the same config but for BRANCH_MAY_DIFFER,
  the same LR at every step before it;
- a checkpoint written by another number of ranks is resumed only where the run's steps are
  the same ones on both.

vitscale.common.checkpoint reads and writes the files; this module decides what goes in them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from vitscale.common import checkpoint, dist, errors, rng, rundir
from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text
from vitscale.common.records import dump_yaml, to_dict
from vitscale.data.sampler import EpochSampler
from vitscale.train import parallel
from vitscale.train.amp import Scaler
from vitscale.train.config import RunConfig, load_yaml
from vitscale.train.ema import EMA
from vitscale.train.steps import Plan

logger = logging.getLogger(__name__)

# Where a run lies and what it started from: no part of what it is once it has a checkpoint
# (the weights carry them), so a run moved, or whose init moved, resumes.
_PLACE = {"out", "init", "init_allow", "train.branch_from"}
# What a run stopped by a non-finite loss is told to change before it resumes: these may differ
# on resume (the change is logged and config.yaml rewritten); any other field may not.
RECOVERY = {"train.base_lr", "train.clip_grad", "train.dtype"}
# How the state is held across ranks, not what is trained: a run may resume under other values
# (a sharded FSDP run on one process, train.fsdp off), logged like RECOVERY's.
PARALLELISM = {"train.fsdp", "train.sharded_ckpt"}
# Config keys a branch (train.branch_from) may set apart from its parent: its length and
# schedule (checked step by step instead), bookkeeping, and where it runs.
BRANCH_MAY_DIFFER = {"out", "data.workers", *(f"train.{k}" for k in (
    "epochs", "max_steps", "schedule", "decay_frac", "min_lr", "keep_steps", "ckpt_every", "keep_last",
    "branch_from", "knn_k", "device", "threads", "fsdp", "sharded_ckpt"))}


def prepare_run_dir(cfg: RunConfig, d: dist.Dist) -> Path:
    """Create the run directory; refuse one that holds a different run (but for RECOVERY fields,
    logged). A run's config.yaml is written when it starts, without `out`: a run directory is
    where it is, moved or copied. What the directory may be was checked before its lock was taken
    (engine.check_run_dir)."""
    run_dir = Path(cfg.out)
    if d.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
            errors.crash_dir(run_dir)
        except OSError as e:
            raise UserError(f"cannot write to run directory {str(run_dir)!r}: {e.strerror}") from None
        saved = run_dir / rundir.RUN
        started = saved.is_file() and bool(checkpoint.checkpoints(run_dir))
        differ = differences(load_yaml(saved), cfg, _PLACE) if started else {}
        refused = [said for key, said in differ.items() if key not in RECOVERY | PARALLELISM]
        if refused:
            raise UserError(f"{str(run_dir)!r} holds a run with another config ({'; '.join(refused[:3])}); "
                             f"resume it with --config {saved} or choose a new --out")
        if differ:
            logger.info(f"resuming with a changed recipe: {'; '.join(differ.values())}")
        if not started or differ:
            atomic_write_text(saved, dump_yaml(cfg, leave_out=("out",)))
    dist.barrier(d)
    return run_dir


def differences(saved: RunConfig, cfg: RunConfig, ignored: set[str]) -> dict[str, str]:
    """{key: "key is A there, B here"} for each field but `ignored` in which `cfg` differs from
    `saved` (a run's config.yaml, a branch's parent's)."""
    theirs, mine = _flat(to_dict(saved)), _flat(to_dict(cfg))
    return {k: f"{k} is {theirs.get(k)!r} there, {mine.get(k)!r} here"
            for k in sorted(theirs.keys() | mine.keys()) if k not in ignored and theirs.get(k) != mine.get(k)}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}."""
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


class Checkpointer:
    """Saves and resumes one run's training state in its run directory.

    Args:
        cfg, d, run_dir, log: the run's resolved config, its ranks, its directory and its log.
        module, opt, scaler, ema: what a checkpoint holds of the run (ema None without train.ema).
        n_train: the training set's size (the steps on another number of ranks follow from it).
        plan_of: the steps of a run of a config on this run's data and ranks (the engine's).
        lr: the LR of a step under this run's schedule, or under another config's (a parent's).
    """

    def __init__(self, cfg: RunConfig, d: dist.Dist, run_dir: Path, *, module: torch.nn.Module,
                 opt: torch.optim.Optimizer, scaler: Scaler, ema: EMA | None, n_train: int,
                 plan_of: Callable[[RunConfig], Plan], lr: Callable[[int, RunConfig | None], float]):
        self.cfg, self.d, self.run_dir = cfg, d, run_dir
        self.module, self.opt, self.scaler, self.ema = module, opt, scaler, ema
        self.n_train, self.plan_of, self.lr = n_train, plan_of, lr

    def last_good(self) -> str:
        """The checkpoint a stopped run resumes from, in words ("none" where there is none yet)."""
        return str(checkpoint.last_good(self.run_dir) or "none")

    def latest(self) -> Path | None:
        """The newest checkpoint written (whole or not: what a signal leaves)."""
        return checkpoint.latest(self.run_dir)

    def publish_best(self, ckpt: Path) -> None:
        """Make `ckpt` the run's best/ (rank 0's call)."""
        checkpoint.publish_best(self.run_dir, ckpt)

    def at(self, step: int) -> Path:
        """Where the run's checkpoint of step `step` is."""
        return checkpoint.at(self.run_dir, step)

    def resume(self) -> tuple[int, float | None]:
        """(step, best score) to go on from: the run directory's newest whole checkpoint restored
        (a damaged one is passed over with a warning naming what is wrong); with none, a branch
        started from train.branch_from if set (its best score is not inherited: the branch's
        best/ is its own); else (0, None), nothing restored."""
        shapes = {k: v.shape for k, v in self.module.state_dict().items()}
        found = checkpoint.newest_good(self.run_dir, shapes, whole=False)
        branch = found is None and bool(self.cfg.train.branch_from)
        if branch:
            found = self._parent(Path(self.cfg.train.branch_from), shapes)
        if found is None:
            return 0, None
        if branch:
            self._check_branch(found.path, found.step)
        if found.world != self.d.world:
            self._check_world(found.path, found.world)
        self._restore(found)
        logger.info(f"{'branched' if branch else 'resumed'} from {found.path} at step {found.step}")
        return found.step, None if branch else found.best

    def _parent(self, ckpt: Path, shapes: dict[str, torch.Size]) -> checkpoint.Checkpoint:
        """The checkpoint a branch starts from, read whole or refused in one line."""
        if not checkpoint.is_checkpoint(ckpt):
            raise UserError(f"train.branch_from={str(ckpt)!r} is not a checkpoint directory "
                             f"(RUN/{checkpoint.PREFIX}STEP with state.json and safetensors files)")
        try:
            return checkpoint.load(ckpt, shapes, whole=False)
        except checkpoint.Damaged as e:
            raise UserError(f"train.branch_from: {e}") from None

    def _restore(self, found: checkpoint.Checkpoint) -> None:
        """Set the module, optimizer, EMA, loss scale and this rank's generators to `found`'s."""
        state = found.state
        if found.sharded or parallel.is_sharded(self.module):
            self._restore_dcp(found)
        else:  # every rank read the same files: each sets its own copy, nothing to broadcast
            set_full_state(self.module, self.opt, found.model, found.optim)
        if self.ema is not None:
            if found.ema is None:
                raise UserError(f"{found.path} holds no EMA weights (ema.safetensors) but this run has "
                                 f"train.ema={self.cfg.train.ema:g}; resume with the train.ema it was "
                                 "started with")
            self.ema.load_state_dict(found.ema)
        if self.scaler.enabled and state.get("scaler"):  # none: the run was not fp16 before
            self.scaler.load_state_dict(state["scaler"])
        if not checkpoint.restore_rng(found.path, state, self.d.rank):  # saved by fewer ranks
            torch.manual_seed(rng.rank_seed(self.cfg.train.seed + found.step, self.d.rank))

    def _restore_dcp(self, found: checkpoint.Checkpoint) -> None:
        """`_restore`'s model and optimizer for a sharded checkpoint, or into a sharded module."""
        # Imported here, not at the top: DCP's state-dict functions import FSDP and DTensor
        # (~1.3 s), which only sharded checkpoints and sharded modules need.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_state, optim_state = found.model, found.optim
        if found.sharded:  # this rank's part, from whichever ranks' shards hold it (DCP reshards)
            model_state, optim_state = checkpoint.load_shards(found.path, *get_state_dict(
                self.module, self.opt, options=StateDictOptions(full_state_dict=False)), optim_state,
                no_dist=not self.d.enabled)
        set_state_dict(self.module, self.opt, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=not found.sharded,
                                                broadcast_from_rank0=self.d.enabled and not found.sharded))

    def _check_world(self, ckpt: Path, world: int) -> None:
        """Resuming on another number of ranks than `world`, which wrote `ckpt`: the run goes on
        only where its steps are the same ones (each epoch's steps and their global positions in
        the data order; the global batch is the same, the micro-batch not); said in the log."""
        t, d, m = self.cfg.train, self.d, self.cfg.model
        micro = t.batch // (world * t.accum)
        if micro * world * t.accum != t.batch:
            raise UserError(f"{ckpt} was written by {world} ranks, and batch {t.batch} does not divide "
                            f"among them; resume on {world} ranks")
        theirs = Plan(t, m.frames, m.hw[0], m.tubelet, m.patch_size,
                      len(EpochSampler(self.n_train, t.seed, 0, world=world)), micro * t.accum)

        def steps(plan: Plan, ranks: int) -> tuple:  # the run's steps, offsets as global positions
            return plan.total, plan.starts, plan.shapes, [o * ranks for o in plan.offsets]

        if steps(theirs, world) != steps(self.plan_of(self.cfg), d.world):
            raise UserError(f"{ckpt} was written by {world} ranks, and an epoch of {self.n_train} "
                            f"items has other steps on {world} ranks than on {d.world} (the data is padded "
                            f"to a multiple of the ranks); resume on {world} ranks")
        fresh = f"; ranks {world}-{d.world - 1} seed their RNG from seed and step" if d.world > world else ""
        logger.info(f"resuming on {d.world} rank(s) a checkpoint {world} rank(s) wrote: the global batch "
                    f"{t.batch} is kept (micro-batch {micro} -> {t.batch // (d.world * t.accum)}), the data "
                    f"goes on from the same position{fresh}")

    def _check_branch(self, ckpt: Path, step: int) -> None:
        """A branch must be its parent's run continued: the same config but for BRANCH_MAY_DIFFER,
        and the same LR at every step before the branch point."""
        saved = ckpt.parent / rundir.RUN
        if not saved.is_file():
            raise UserError(f"train.branch_from={str(ckpt)!r} has no config.yaml beside it to check "
                             "that this run continues it")
        parent = load_yaml(saved)
        if differ := differences(parent, self.cfg, BRANCH_MAY_DIFFER):
            raise UserError(f"train.branch_from={str(ckpt)!r}: a branch must keep its parent's config, but "
                             + ", ".join(differ.values()))
        total = self.plan_of(self.cfg).total
        if step >= total:
            raise UserError(f"train.branch_from={str(ckpt)!r} is at step {step}, not before this run's "
                             f"last ({total})")
        for s in range(step):
            if self.lr(s, parent) != self.lr(s, None):
                raise UserError(f"train.branch_from={str(ckpt)!r}: its run's LR at step {s} was "
                                 f"{self.lr(s, parent):.4g}, this run's would be {self.lr(s, None):.4g}; "
                                 "branch from a step no later than this run's decay start "
                                 "(optim.decay_start)")

    def save(self, step: int, best: float | None) -> Path | None:
        """Checkpoint step `step` (rank 0 writes; every rank takes part in gathering), or with
        train.sharded_ckpt every rank its own shards (rank 0 the rest); its path on rank 0."""
        t, d = self.cfg.train, self.d
        sharded = t.sharded_ckpt
        if sharded or parallel.is_sharded(self.module):
            # Imported here for the reason _restore_dcp gives.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_state, optim_state = get_state_dict(self.module, self.opt, options=StateDictOptions(
                full_state_dict=not sharded, cpu_offload=not sharded))
        else:  # rank 0 writes it; DCP too gives the other ranks empty dicts
            model_state, optim_state = full_state(self.module, self.opt) if d.main else ({}, {})
        rngs = dist.gather_object(d, rng.rng_state())  # every rank's generators
        state = {"step": step, "best": best, "scaler": self.scaler.state_dict()}
        path = None
        if sharded:
            path = checkpoint.save_sharded(self.run_dir, step, model_state, optim_state, state, d,
                                           t.keep_last, t.keep_steps, rngs)
        elif d.main:
            path = checkpoint.save(self.run_dir, step, model_state, optim_state, state, t.keep_last,
                                   t.keep_steps, rngs, ema_state=self.ema.state_dict() if self.ema else None)
        dist.barrier(d)
        return path


def full_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts whole on the CPU, for a module no rank shards
    (plain, DDP's or compiled): what DCP's get_state_dict(full_state_dict=True, cpu_offload=True)
    gives, without importing it (it imports FSDP). The model's keys are its parameters' and
    buffers' names, without DDP's `module.` or torch.compile's `_orig_mod.`; the optimizer's state
    and param groups are keyed by those parameter names instead of positions."""
    inner = parallel.unwrapped(module)
    model = {k: v.cpu() for k, v in inner.state_dict().items()}
    names = _param_names(inner, opt)
    saved = opt.state_dict()  # keyed by position over the param groups, as `names` is
    state = {names[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in per.items()}
             for i, per in saved["state"].items()}
    groups = [g | {"params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
    return model, {"state": state, "param_groups": groups}


def set_full_state(module: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict,
                   optim_state: dict) -> None:
    """Set `full_state`'s dicts (of this module, or read back from a checkpoint) into the module
    and the optimizer, strictly, as DCP's set_state_dict(full_state_dict=True) does: every key of
    the model, and the state of every trainable parameter of the optimizer, each by name."""
    inner = parallel.unwrapped(module)
    inner.load_state_dict(model_state)
    names = _param_names(inner, opt)
    group_of = {name: g for g in optim_state["param_groups"] for name in g["params"]}
    state, groups, i = {}, [], 0
    for group in opt.param_groups:
        mine = names[i:i + len(group["params"])]
        i += len(mine)
        unknown = [n for n in mine if n not in group_of]
        stateless = [n for n, p in zip(mine, group["params"], strict=True)
                     if p.requires_grad and n not in optim_state["state"]]
        if unknown or stateless:
            raise RuntimeError(f"the optimizer state has no {'group' if unknown else 'state'} for "
                               f"parameter {(unknown or stateless)[0]!r}")
        # a group's settings (its LR scale, weight decay) are those of its parameters' group there
        theirs = group_of[mine[0]] if mine else optim_state["param_groups"][len(groups)]
        groups.append(theirs | {"params": mine})
        state |= {n: optim_state["state"][n] for n in mine if n in optim_state["state"]}
    # Optimizer.load_state_dict pairs params by position (names here) and casts each state
    # tensor to its parameter's device and dtype
    opt.load_state_dict({"state": state, "param_groups": groups})


def _param_names(module: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name in `module` of each of `opt`'s parameters, in the order of its param groups (the
    positions its state dict keys them by)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]
