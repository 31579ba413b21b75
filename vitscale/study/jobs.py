"""A study's jobs, wherever a launcher runs them: one job (`run_job`) or a run's ranks on one node
(`run_ranks`), its value carried back as JSON (`encode`, `decode`: the study's typed records only,
never a pickle), a mistake of the user's carried back as what it is (`Failed`), and the jobs a
remote launcher waits on, resubmitted when they fail (`Waiting`).

A job runs `run_job` on its node: its threads, its output appended to its log file, SIGTERM /
SIGUSR1 stopping it at a checkpoint. A mistake of the user's (UserError) or a non-finite loss
(StopTraining) there comes back as what it is, raised where the study runs, never retried.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, is_dataclass
from pathlib import Path

import torch

from vitscale.common import dist, logs, signals
from vitscale.common.errors import StopTraining, UserError
from vitscale.study import results
from vitscale.study.results import SeedResult, Sizing, SweepPoint
from vitscale.train.engine import TrainResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failed:
    """A job's UserError or StopTraining, carried back to be raised where the study runs."""

    error: str  # the class of what was raised: UserError or StopTraining
    message: str

    def raise_(self) -> None:
        raise (UserError if self.error == "UserError" else StopTraining)(self.message)


# ----------------------------------------------------------------------------- a job's value as JSON
_RECORDS = {c.__name__: c for c in (Sizing, SweepPoint, SeedResult, Failed)}  # what a job returns


def _plain(value):
    if isinstance(value, TrainResult):  # a job that is one run (engine.train): metrics, step and best
        return {"kind": "TrainResult", "metrics": value.metrics, "step": value.step, "best": value.best}
    if is_dataclass(value):
        if type(value).__name__ not in _RECORDS:
            raise TypeError(f"a job returned a {type(value).__name__}, which encode does not know")
        return results.to_dict(value)
    if isinstance(value, dict):  # {name: record} (the sizing job) or a run's final metrics
        return {"kind": "map", "items": {str(k): _plain(v) for k, v in value.items()}}
    return value


def encode(value) -> str:
    """A job's value as JSON: None, a study record (Sizing, SweepPoint, SeedResult, Failed), a
    {name: value} map of them, or a run's TrainResult."""
    return json.dumps(_plain(value))


def _built(data):
    if not isinstance(data, dict):
        return data
    kind = data.get("kind")
    if kind == "map":
        return {k: _built(v) for k, v in data["items"].items()}
    if kind == "TrainResult":
        return TrainResult(dict(data["metrics"]), data["step"], data["best"])
    if kind not in _RECORDS:
        raise ValueError(f"{kind!r} is not a job value vitscale reads")
    return results.from_dict(_RECORDS[kind], data, "a job's value")


def decode(text: str):
    """`encode`'s value back: only the study's own records are built (ValueError on anything else)."""
    return _built(json.loads(text))

def run_job(fn, args: tuple, log_path: str | Path, threads: int):
    """One job on a launcher's node: `threads` torch threads, output appended to `log_path`
    (restored after, as a Ray worker runs more than one), signals stopping it at a checkpoint."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "a") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            torch.set_num_threads(threads)
            with signals.deferred(), logs.plain():
                return fn(*args)
    except (UserError, StopTraining) as e:
        return Failed(type(e).__name__, str(e))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def takes_dist(args: tuple) -> bool:
    """Whether a job is one of the study's runs, which take their `dist.Dist` last (the sizing does not)."""
    return bool(args) and isinstance(args[-1], dist.Dist)


def as_rank(run, args: tuple, device: str):
    """`run(args)` as one rank of the process group the environment describes (torchrun's variables),
    its `Dist` in place of the job's last argument."""
    d = dist.setup(device)
    try:
        return run((*args[:-1], d))
    finally:
        dist.teardown(d)


def run_ranks(fn, args: tuple, log_path: str | Path, threads: int, ranks: int, device: str):
    """A job on `ranks` processes of this node, joined as `torchrun --standalone` joins them, each with
    threads // ranks torch threads; rank 0's value. A job that is not a run runs here alone."""
    if ranks == 1 or not takes_dist(args):
        return run_job(fn, args, log_path, threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:  # on this node, as the ranks are
        out = Path(tmp) / "rank0.json"
        torch.multiprocessing.start_processes(
            _rank, args=(fn, args, str(log_path), max(1, threads // ranks), device, ranks, port, str(out)),
            nprocs=ranks, start_method="spawn")  # raises when a rank fails: the task fails, and is run again
        return decode(out.read_text())


def _rank(local: int, fn, args: tuple, log_path: str, threads: int, device: str, world: int, port: int,
          out: str) -> None:
    os.environ.update(RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    value = as_rank(lambda a: run_job(fn, a, log_path, threads), args, device)
    if local == 0:
        Path(out).write_text(encode(value))


class Waiting:
    """Jobs submitted and not yet done, resubmitted up to `retries` times when they fail."""

    def __init__(self, retries: int):
        self.retries = retries
        self.pending: dict = {}  # handle -> (name, job tuple, tries)

    def add(self, handle, name: str, job: tuple, tries: int = 0) -> None:
        self.pending[handle] = (name, job, tries)

    def finished(self, handle, value, error: str | None, resubmit) -> tuple[str, object] | None:
        """(name, value) of a finished job; None when it failed and was submitted again."""
        name, job, tries = self.pending.pop(handle)
        if error is not None:
            if tries >= self.retries:
                raise StopTraining(f"{name} failed {tries + 1} times (last: {error}); its log: {job[3]}")
            logger.info(f"{name} failed ({error}); submitted again, its runs resume from their checkpoints")
            self.add(resubmit(job), name, job, tries + 1)
            return None
        if isinstance(value, Failed):
            value.raise_()
        return name, value


def last_line(e: BaseException | str) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]

