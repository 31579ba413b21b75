"""Atomic checkpoints: safetensors weights and optimizer state, JSON for the rest.

A checkpoint is a directory `ckpt-STEP/` holding
  model.safetensors   the trained module's state dict
  optim.safetensors   every optimizer state tensor, keyed `PARAM_NAME/STATE_NAME`
  rng.safetensors     the torch CPU (and CUDA) generator states; rank R's (R > 0) as `rankR/NAME`
  ema.safetensors     (runs with train.ema only) the moving average of the weights, keyed as model's
  state.json          step, epoch, param groups, python / numpy RNG (rank R's in rank_rng), metrics
A sharded checkpoint (train.sharded_ckpt, FSDP runs) holds `shards/` instead of the model and
optimizer files: DCP files (torch.distributed.checkpoint) of the flat dict `model/NAME`,
`optim/PARAM_NAME/STATE_NAME`, each rank writing its own shards (`save_sharded`: no rank holds
the whole state). They are read back onto any number of ranks (`load_shards`, resharded), or
whole into one process (`read_shards`: eval, export, soups, --init).

It is written into `ckpt-STEP.tmp/`, each file fsynced, then renamed into place (a sharded
one: by rank 0, once every rank has written its shards), so a kill at any moment leaves either
the old set of checkpoints or the new one, never half a file. `best/` is replaced the same way.

Reading never trusts a checkpoint: `load` checks the whole of one (every file there and
readable, state.json complete, finite weights of the model's shapes; for a sharded one its
`.metadata` readable, every shard file it names there and long enough, the shapes it records
the model's) before anything is restored, and `newest_good` passes over damaged ones to the
newest that is whole. The ranks that wrote a checkpoint: `world_of` (its RNG states).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitscale.common.errors import UserError
from vitscale.common.io import fsync
from vitscale.common.rng import rng_state, set_rng_state
from vitscale.common.rundir import BEST

logger = logging.getLogger(__name__)

PREFIX = "ckpt-"
SHARDS = "shards"  # a sharded checkpoint's DCP directory
_NAME = re.compile(rf"{PREFIX}\d+")  # ckpt-STEP, not ckpt-STEP.tmp / .old


class Damaged(UserError):
    """A checkpoint that cannot be used as it is; the message names it and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    """What `load` read of a checkpoint, checked whole; nothing of it restored yet."""

    # the checkpoint directory (ckpt-STEP/, best/, or a branch's parent's)
    path: Path
    # the model's state dict; None for a sharded one read with whole=False (a resume: load_shards)
    model: dict[str, torch.Tensor] | None
    # the optimizer's state dict by parameter name (a sharded one's: param groups and scalars only)
    optim: dict
    # the rest of state.json: step, best, scaler, and every rank's python / numpy RNG state
    state: dict
    # the moving average of the weights (train.ema runs), keyed as model; else None
    ema: dict[str, torch.Tensor] | None
    # whether the model and optimizer are DCP shards (`save_sharded`)
    sharded: bool

    @property
    def step(self) -> int:
        """The optimizer step it was written at."""
        return self.state["step"]

    @property
    def best(self) -> float | None:
        """The run's best validation score when it was written (None: none yet, or no validation)."""
        return self.state.get("best")

    @property
    def world(self) -> int:
        """How many ranks wrote it (`world_of`)."""
        return world_of(self.state)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _optim_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict keyed by parameter name -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, per_param in state["state"].items():
        for name, value in per_param.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{param}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optim_join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        param, name = key.rsplit("/", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def at(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of optimizer step `step` is (or would be)."""
    return Path(run_dir) / f"{PREFIX}{step:08d}"


def step_of(ckpt: Path) -> int:
    """The optimizer step of a checkpoint directory `ckpt-STEP`."""
    return int(ckpt.name[len(PREFIX):])


def save(run_dir: Path, step: int, model_state: dict, optim_state: dict, state: dict,
         keep_last: int = 2, keep_steps: tuple[int, ...] = (), rngs: list | None = None,
         ema_state: dict | None = None) -> Path:
    """Write `ckpt-STEP/` atomically and prune all but the newest `keep_last`, never `keep_steps`.
    `rngs`: every rank's `rng_state()`, rank 0's first (default: this process's alone);
    `ema_state`: the EMA weights of a run with train.ema (ema.safetensors)."""
    final = at(run_dir, step)
    tmp = _fresh(run_dir, final)
    optim_tensors, optim_rest = _optim_split(optim_state)
    files = {
        "model.safetensors": _contiguous(model_state),
        "optim.safetensors": _contiguous(optim_tensors),
    } | ({"ema.safetensors": _contiguous(ema_state)} if ema_state is not None else {})
    return _publish(run_dir, tmp, final, files, state, optim_rest, rngs, keep_last, keep_steps)


def save_sharded(run_dir: Path, step: int, model_state: dict, optim_state: dict, state: dict, d,
                 keep_last: int = 2, keep_steps: tuple[int, ...] = (),
                 rngs: list | None = None) -> Path | None:
    """Every rank's call: `ckpt-STEP/` with this rank's shards of `model_state` / `optim_state`
    (get_state_dict(full_state_dict=False): DTensors under FSDP) written by DCP into `shards/`,
    the rest (state.json, rng.safetensors: `rngs` gathered on rank 0) by rank 0 as `save` does,
    which publishes it once every rank has written. `d`: the ranks (vitscale.common.dist.Dist).
    The path on rank 0, None on the others."""
    import torch.distributed.checkpoint as dcp

    from vitscale.common import dist

    final = at(run_dir, step)
    tmp = _fresh(run_dir, final) if d.main else None
    dist.barrier(d)
    optim_tensors, optim_rest = _optim_split(optim_state)
    try:
        with _one_process():
            dcp.save(_flat(model_state, optim_tensors), checkpoint_id=run_dir / f"{final.name}.tmp" / SHARDS,
                     no_dist=not d.enabled)
    except dcp.CheckpointException as e:  # every rank gets any rank's error (a full disk: ENOSPC)
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)  # the older checkpoints stay
        cause = _failure(e)
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, cause.filename) from None
        raise
    dist.barrier(d)  # every rank's shards and rank 0's .metadata written (and fsynced) before the rename
    if d.main:
        return _publish(run_dir, tmp, final, {}, state, optim_rest, rngs, keep_last, keep_steps)
    return None


def _fresh(run_dir: Path, final: Path) -> Path:
    """An empty `ckpt-STEP.tmp/` (with `shards/` in it) to write checkpoint `final` into."""
    tmp = run_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SHARDS).mkdir(parents=True)
    return tmp


def _publish(run_dir: Path, tmp: Path, final: Path, files: dict, state: dict, optim_rest: dict,
             rngs: list | None, keep_last: int, keep_steps: tuple[int, ...]) -> Path:
    """Write `files` (name -> tensors), rng.safetensors and state.json into `tmp`, fsync, rename
    it to `final`, and prune all but the newest `keep_last` checkpoints (never `keep_steps`)."""
    rngs = rngs or [rng_state()]
    rng_tensors = {f"rank{r}/{k}" if r else k: v for r, (tensors, _) in enumerate(rngs)
                   for k, v in tensors.items()}
    rng_rest = rngs[0][1] | ({"rank_rng": [rest for _, rest in rngs[1:]]} if len(rngs) > 1 else {})
    files = files | {"rng.safetensors": _contiguous(rng_tensors)}
    if not any((tmp / SHARDS).iterdir()):
        (tmp / SHARDS).rmdir()  # a full checkpoint
    try:
        for name, tensors in files.items():
            _save_tensors(tensors, tmp / name)
        (tmp / "state.json").write_text(json.dumps(state | {"optim": optim_rest, "rng": rng_rest}))
        for path in [*tmp.iterdir(), *(tmp / SHARDS).glob("*")]:
            fsync(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: free what was written; the older ones stay
        raise
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync(run_dir)
    prunable = [c for c in checkpoints(run_dir) if step_of(c) not in keep_steps]
    for old in [*run_dir.glob(f"{PREFIX}*.old"), *(prunable[:-keep_last] if keep_last > 0 else [])]:
        gone = old.with_name(f"{_NAME.match(old.name).group()}.old")
        os.replace(old, gone)  # out of the list at once: a kill mid-delete leaves no half checkpoint
        shutil.rmtree(gone, ignore_errors=True)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, its I/O errors raised as the OSError they are (a full disk: ENOSPC)."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # "... I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def publish_best(run_dir: Path, ckpt: Path) -> None:
    """Make `best/` a copy of a finished checkpoint, replacing the old one atomically."""
    tmp, best, old = run_dir / f"{BEST}.tmp", run_dir / BEST, run_dir / f"{BEST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ckpt, tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: the old best/ stays
        raise
    fsync(tmp)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    fsync(run_dir)


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories `ckpt-STEP`, oldest first (unfinished `.tmp` ones are ignored;
    `load` tells whether one is whole)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=step_of)


def is_checkpoint(path: Path) -> bool:
    """A finished checkpoint directory (what `save` or `save_sharded` writes, not a `.tmp` one)."""
    return path.is_dir() and path.name.startswith(PREFIX) and not path.name.endswith(".tmp") and (
        path / "state.json").is_file() and (is_sharded(path) or all(
            (path / name).is_file() for name in ("model.safetensors", "optim.safetensors")))


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint `save_sharded` wrote (a `shards/` directory of DCP files, no model.safetensors)."""
    return (ckpt / SHARDS).is_dir() and not (ckpt / "model.safetensors").exists()


def world_of(state: dict) -> int:
    """How many ranks wrote a checkpoint (its state.json's dict): one RNG state each."""
    return 1 + len(state["rng"].get("rank_rng", []))


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load(ckpt: Path, shapes: dict[str, torch.Size] | None = None, whole: bool = True) -> Checkpoint:
    """A checkpoint's contents, checked whole; restores nothing yet.

    The whole checkpoint is checked first: every file there and readable, state.json complete,
    the weights finite and, given `shapes` (the model's state-dict shapes), each model and
    optimizer tensor the shape of the model's. Damaged says what is wrong.

    A sharded checkpoint is checked from its `.metadata` (its shard files there and long enough,
    the shapes it records); its model weights are read whole into this process (`read_shards`)
    unless `whole` is False (then None: a resume reads its own shards, `load_shards`), and
    its optimizer state holds only what state.json has (param groups, scalars).
    """
    state = _read(ckpt / "state.json", lambda p: json.loads(p.read_text()))
    sharded = is_sharded(ckpt)
    if sharded:
        meta = _metadata(ckpt)
        sizes = {k: torch.empty(md.size, dtype=md.properties.dtype, device="meta")
                 for k, md in meta.state_dict_metadata.items() if hasattr(md, "chunks")}
        model = {k[len("model/"):]: v for k, v in sizes.items() if k.startswith("model/")}
        optim_tensors = {k[len("optim/"):]: v for k, v in sizes.items() if k.startswith("optim/")}
    else:
        model = _read(ckpt / "model.safetensors", lambda p: load_file(str(p)))
        optim_tensors = _read(ckpt / "optim.safetensors", lambda p: load_file(str(p)))
    rng = _read(ckpt / "rng.safetensors", lambda p: load_file(str(p)))
    try:
        optim_rest = state.pop("optim")
        optim = _optim_join({} if sharded else optim_tensors, optim_rest)
        _check_state(ckpt, state, optim_rest["param_groups"], rng)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise Damaged(f"{ckpt / 'state.json'} is incomplete or wrong ({type(e).__name__}: {e})") from None
    if sharded:
        _check_shapes(ckpt, model, optim_tensors, shapes, SHARDS)
        model = _finite(ckpt, read_shards(ckpt), SHARDS) if whole else None
    else:
        _check_shapes(ckpt, _finite(ckpt, model), optim_tensors, shapes)
    ema_path = ckpt / "ema.safetensors"
    ema = _read(ema_path, lambda p: load_file(str(p))) if ema_path.is_file() else None
    if ema is not None:
        _check_shapes(ckpt, _finite(ckpt, ema, "ema"), {}, shapes, "ema")
    return Checkpoint(ckpt, model, optim, state, ema, sharded)


def _metadata(ckpt: Path):
    """A sharded checkpoint's DCP metadata, its shard files checked to be there and long enough."""
    from torch.distributed.checkpoint import FileSystemReader

    where = ckpt / SHARDS
    path = _read(where / ".metadata", lambda p: p)
    try:
        meta = FileSystemReader(where).read_metadata()
        pieces = list(meta.storage_data.values())
        needed = {}
        for info in pieces:
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a cut or garbled pickle: EOFError, UnpicklingError, AttributeError ...
        raise Damaged(f"{path} cannot be read ({type(e).__name__}: {str(e)[:80]})") from None
    for name, size in sorted(needed.items()):
        file = where / name
        if not file.is_file():
            raise Damaged(f"{file} is missing (its .metadata names it)")
        if file.stat().st_size < size:
            raise Damaged(f"{file} is cut short ({file.stat().st_size} bytes, its .metadata needs {size})")
    return meta


def read_shards(ckpt: Path, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """A sharded checkpoint's tensors under `prefix` (its model weights), each whole, on the CPU of
    this one process (no process group needed): DCP gathers them from every rank's shard files."""
    import torch.distributed.checkpoint as dcp

    meta = _metadata(ckpt)
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in
               meta.state_dict_metadata.items() if k.startswith(prefix) and hasattr(md, "chunks")}
    try:
        with _one_process():
            dcp.load(tensors, checkpoint_id=ckpt / SHARDS, no_dist=True)
    except dcp.CheckpointException as e:  # bad bytes in a shard
        raise Damaged(f"{ckpt / SHARDS} cannot be read ({_said(_failure(e))})") from None
    return {k[len(prefix):]: v for k, v in tensors.items()}


def load_shards(ckpt: Path, model_state: dict, optim_state: dict, saved_optim: dict,
                no_dist: bool) -> tuple[dict, dict]:
    """Fill `model_state` and `optim_state` (what this rank holds: get_state_dict's, sharded or
    whole, on any number of ranks; every rank calls it) in place from a sharded checkpoint: DCP
    reads each rank's part from whichever shards hold it. Returns them, the optimizer's param
    groups and scalars those of `saved_optim` (`load`'s optimizer state of the checkpoint)."""
    import torch.distributed.checkpoint as dcp

    optim_tensors, _ = _optim_split(optim_state)
    try:
        with _one_process():
            dcp.load(_flat(model_state, optim_tensors), checkpoint_id=ckpt / SHARDS, no_dist=no_dist)
    except dcp.CheckpointException as e:  # on every rank: bad bytes in a shard, a key the run lacks
        raise Damaged(f"{ckpt / SHARDS} cannot be read into this run ({_said(_failure(e))})") from None
    return model_state, _optim_join(optim_tensors, _optim_split(saved_optim)[1])


def _failure(e) -> BaseException:
    """The first failing rank's error inside DCP's CheckpointException."""
    return next(iter(e.failures.values()))[0]


def _said(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


@contextmanager
def _one_process():
    """DCP without a process group, as meant: without its warning that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flat(model_state: dict, optim_tensors: dict) -> dict:
    """The one flat dict a sharded checkpoint holds: `model/NAME`, `optim/PARAM_NAME/STATE_NAME`."""
    return {f"model/{k}": v for k, v in model_state.items()} | {
        f"optim/{k}": v for k, v in optim_tensors.items()}


def newest_good(run_dir: Path, shapes: dict[str, torch.Size] | None = None, warn: bool = True,
                first: tuple[Path, ...] = (), whole: bool = True) -> Checkpoint | None:
    """The newest checkpoint of a run that `load` accepts (`first`, e.g. best/, before the rest),
    as `load` gave it (`whole`: as load's); each one passed over is named in a warning (unless
    not `warn`) with what is wrong with it. None where the run has none; Damaged where it has
    some and none is whole."""
    problems = []
    for ckpt in [*(p for p in first if p.exists()), *reversed(checkpoints(run_dir))]:
        try:
            loaded = load(ckpt, shapes, whole)
        except Damaged as e:
            problems.append(str(e))
            continue
        for problem in problems if warn else []:
            logger.warning(f"{problem}; using {ckpt} instead")
        return loaded
    if problems:
        more = f" (and {len(problems) - 1} older one(s) cannot be used either)" if len(problems) > 1 else ""
        raise Damaged(f"no usable checkpoint in {run_dir}: {problems[0]}{more}; put back what changed (a "
                      "checkpoint's files, or the run's config.yaml), or start again in another directory")
    return None


def last_good(run_dir: Path) -> Path | None:
    """The newest whole checkpoint with finite weights (a sharded one's not read: its shards whole),
    or None (what a stopped run resumes from)."""
    try:
        found = newest_good(run_dir, warn=False, whole=False)
    except Damaged:
        return None
    return found.path if found else None


def _read(path: Path, reader):
    """reader(path), or Damaged naming the file when it is missing or cannot be read."""
    if not path.is_file():
        raise Damaged(f"{path} is missing")
    try:
        return reader(path)
    except (OSError, ValueError, SafetensorError) as e:  # a cut JSON or safetensors file, bad bytes
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Damaged(f"{path} cannot be read ({why})") from None


def _check_state(ckpt: Path, state: dict, groups: list, rng: dict[str, torch.Tensor]) -> None:
    """state.json's step, best score and optimizer groups are what `save` writes; its RNG state
    applies (tried, then undone)."""
    step, best = state["step"], state.get("best")
    if type(step) is not int or step < 0 or (_NAME.fullmatch(ckpt.name) and step != step_of(ckpt)):
        raise ValueError(f"step {step!r} is not this checkpoint's")
    if best is not None and not isinstance(best, (int, float)):
        raise ValueError(f"best {best!r} is not a score")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("optimizer param_groups without params")
    scaler = state.get("scaler")  # fp16's loss scale (vitscale.train.amp); None for fp32 / bf16
    if scaler is not None and not (isinstance(scaler, dict) and type(scaler.get("scale")) is float
                                   and 0 < scaler["scale"] < float("inf")
                                   and type(scaler.get("_growth_tracker")) is int):
        raise ValueError(f"loss scaler state {str(scaler)[:60]} is not a positive scale and a step count")
    before = rng_state()
    try:
        set_rng_state({k: v for k, v in rng.items() if "/" not in k}, state["rng"])
    finally:
        set_rng_state(*before)


def _file(ckpt: Path, name: str) -> Path:
    """Where a checkpoint keeps tensors `name`: `name`.safetensors, or the shards/ directory."""
    return ckpt / (name if name == SHARDS else f"{name}.safetensors")


def _finite(ckpt: Path, model: dict, name: str = "model") -> dict:
    """`model` (the tensors of file `name`.safetensors), Damaged where a weight is not finite."""
    bad = next((k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise Damaged(f"{_file(ckpt, name)} holds non-finite weights ({bad})")
    return model


def _check_shapes(ckpt: Path, model: dict, optim: dict, shapes: dict[str, torch.Size] | None,
                  name: str = "model") -> None:
    """With `shapes`, the model's keys and shapes (optimizer state too) in file `name`.safetensors
    (`shards/` of a sharded checkpoint, whose tensors may be on the meta device)."""
    if shapes is None:
        return
    where = _file(ckpt, name)
    missing = sorted(shapes.keys() - model.keys())
    if missing:
        raise Damaged(f"{where} does not fit this run's model: it lacks "
                      f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    params = {f"{k}/": v for k, v in shapes.items()}  # optimizer state is keyed PARAM/NAME
    optim_file = _file(ckpt, SHARDS if name == SHARDS else "optim")
    for file, key, v, want in [(where, k, v, shapes.get(k)) for k, v in model.items()] + [
            (optim_file, k, v, params.get(k[:k.rfind("/") + 1])) for k, v in optim.items()]:
        if want is None or (v.dim() and v.shape != want):
            raise Damaged(f"{file} does not fit this run's model: {key} is "
                          f"{tuple(v.shape)}, the model's {'(none)' if want is None else tuple(want)}")


def restore_rng(ckpt: Path, state: dict, rank: int = 0) -> bool:
    """Restore rank `rank`'s generators; False if the checkpoint has none for it (fewer ranks)."""
    prefix, tensors = f"rank{rank}/" if rank else "", load_file(str(ckpt / "rng.safetensors"))
    mine = {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}
    rests = [state["rng"], *state["rng"].get("rank_rng", [])]
    if not mine or rank >= len(rests):
        return False
    set_rng_state(mine, rests[rank])
    return True
