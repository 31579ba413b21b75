"""Atomic checkpoints: safetensors weights and optimizer state, JSON for the rest.

A checkpoint is a directory `ckpt-STEP/` holding
  model.safetensors   the trained module's state dict
  optim.safetensors   every optimizer state tensor, keyed `PARAM_NAME/STATE_NAME`
  rng.safetensors     the torch CPU (and CUDA) generator states; rank R's (R > 0) as `rankR/NAME`
  state.json          step, epoch, param groups, python / numpy RNG (rank R's in rank_rng), metrics
It is written into `ckpt-STEP.tmp/`, each file fsynced, then renamed into place, so a
kill at any moment leaves either the old set of checkpoints or the new one, never half a
file. `best/` is replaced the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator the training loop draws from."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    py = random.getstate()
    np_state = np.random.get_state()
    rest = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = rest["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = rest["numpy"]
    np.random.set_state((npv[0], np.array(npv[1], dtype=np.uint32), *npv[2:]))


def at(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of optimizer step `step` is (or would be)."""
    return Path(run_dir) / f"{PREFIX}{step:08d}"


def step_of(ckpt: Path) -> int:
    """The optimizer step of a checkpoint directory `ckpt-STEP`."""
    return int(ckpt.name[len(PREFIX):])


def save(run_dir: Path, step: int, model_state: dict, optim_state: dict, state: dict,
         keep_last: int = 2, keep_steps: tuple[int, ...] = (), rngs: list | None = None) -> Path:
    """Write `ckpt-STEP/` atomically and prune all but the newest `keep_last`, never `keep_steps`.
    `rngs`: every rank's `rng_state()`, rank 0's first (default: this process's alone)."""
    final = at(run_dir, step)
    tmp = run_dir / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optim_tensors, optim_rest = _optim_split(optim_state)
    rngs = rngs or [rng_state()]
    rng_tensors = {f"rank{r}/{k}" if r else k: v for r, (tensors, _) in enumerate(rngs)
                   for k, v in tensors.items()}
    rng_rest = rngs[0][1] | ({"rank_rng": [rest for _, rest in rngs[1:]]} if len(rngs) > 1 else {})
    files = {
        "model.safetensors": _contiguous(model_state),
        "optim.safetensors": _contiguous(optim_tensors),
        "rng.safetensors": _contiguous(rng_tensors),
    }
    for name, tensors in files.items():
        save_file(tensors, str(tmp / name))
    (tmp / "state.json").write_text(json.dumps(state | {"optim": optim_rest, "rng": rng_rest}))
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    prunable = [c for c in checkpoints(run_dir) if step_of(c) not in keep_steps]
    for old in prunable[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish_best(run_dir: Path, ckpt: Path) -> None:
    """Make `best/` a copy of a finished checkpoint, replacing the old one atomically."""
    tmp, best, old = run_dir / "best.tmp", run_dir / "best", run_dir / "best.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    _fsync_dir(tmp)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(run_dir)


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished `.tmp` directories are ignored)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(".tmp") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def is_checkpoint(path: Path) -> bool:
    """A finished checkpoint directory (what `save` writes, not a `.tmp` one)."""
    return path.is_dir() and path.name.startswith(PREFIX) and not path.name.endswith(".tmp") and all(
        (path / name).is_file() for name in ("state.json", "model.safetensors", "optim.safetensors"))


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load(ckpt: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, state dict) of a checkpoint; restores nothing yet."""
    state = json.loads((ckpt / "state.json").read_text())
    optim = _optim_join(load_file(str(ckpt / "optim.safetensors")), state.pop("optim"))
    return load_file(str(ckpt / "model.safetensors")), optim, state


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
