"""Where the study's runs go: this machine, a Slurm cluster (submitit) or a Ray cluster.

A launcher does one thing: run a list of independent jobs (name, fn, args, log path) and call
done(name, value) as each finishes (`map`), so the study keeps its order (sizing, then the
sweep, then seed 0 of every trial, then more seeds) by calling `map` once per phase:

    local   pool.Runner: in this process or a pool of spawned workers (--workers)
    slurm   each job one task of a job array (submitit); a task Slurm preempts or times out
            (its USR2 before the end) stops at a checkpoint and is requeued with the same
            arguments, and a task that dies is resubmitted (`retries`): both resume from
            their run directories, as every vitscale run does; a job of several tasks
            (tasks_per_node, nodes) is one run's ranks, joined as torchrun would join them
    ray     each job a remote task with num_cpus/num_gpus, retried by Ray when its worker dies
            (max_retries); with ranks=N a run's N ranks are processes of its task, joined as
            torchrun --standalone would join them

A job runs `run_job` on its node: its threads, its output appended to its log file, SIGTERM /
SIGUSR1 stopping it at a checkpoint. A mistake of the user's (UserError) or a non-finite loss
(StopTraining) there comes back as what it is, raised here, never retried.

Launcher arguments are checked against a typed table per launcher (LAUNCHER_ARGS) when the study's
config is made, before anything is written or started. A job's value comes back as JSON (`encode`,
`decode`: the study's typed records only), never as a pickle read here. Submitit itself runs each
Slurm job from the pickle it writes in the study's slurm/ folder (`*_submitted.pkl`, loaded on the
node by submitit): whoever can write that folder can run code as the study's jobs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml

from vitscale.common import dist, signals
from vitscale.common.errors import Interrupted, StopTraining, UserError, optional
from vitscale.common.io import atomic_write_text
from vitscale.study import results
from vitscale.study.pool import Runner
from vitscale.study.results import SeedResult, Sizing, SweepPoint


class Launcher(Protocol):
    threads: int  # torch threads of each job
    remote: bool  # jobs run in processes of their own, maybe on other machines

    def map(self, jobs: list[tuple], done) -> None: ...

    def close(self) -> None: ...


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
    if is_dataclass(value):
        if type(value).__name__ not in _RECORDS:
            raise TypeError(f"a job returned a {type(value).__name__}, which encode does not know")
        return results.to_dict(value)
    if isinstance(value, dict):  # {name: record} (the sizing job) or a run's final metrics
        return {"kind": "map", "items": {str(k): _plain(v) for k, v in value.items()}}
    return value


def encode(value) -> str:
    """A job's value as JSON: None, a study record (Sizing, SweepPoint, SeedResult, Failed), a
    {name: value} map of them, or a run's final metrics."""
    return json.dumps(_plain(value))


def _built(data):
    if not isinstance(data, dict):
        return data
    kind = data.get("kind")
    if kind == "map":
        return {k: _built(v) for k, v in data["items"].items()}
    if kind not in _RECORDS:
        raise ValueError(f"{kind!r} is not a job value vitscale reads")
    return results.from_dict(_RECORDS[kind], data, "a job's value")


def decode(text: str):
    """`encode`'s value back: only the study's own records are built (ValueError on anything else)."""
    return _built(json.loads(text))


# ----------------------------------------------------------------------------- launcher arguments
@dataclass(frozen=True)
class Arg:
    """A launcher argument's type and range, read from its KEY=VALUE text."""

    type: type  # int, float, bool, str, list (of strings) or dict
    least: float | None = None  # ints and floats: the smallest allowed
    above: bool = False  # floats: strictly above `least`
    choices: tuple[str, ...] = ()  # strings: the only values allowed

    def read(self, key: str, text: str):
        """The value of `text`, or a one-line UserError saying what `key` takes."""
        try:
            value = self._parse(text.strip())
        except (ValueError, yaml.YAMLError):
            value = None
        if value is None:
            raise UserError(f"launcher argument {key} must be {self.wants()}, got {text!r}")
        return value

    def _parse(self, text: str):
        if self.type is bool:
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
                text.lower())
        if self.type in (int, float):
            value = self.type(text)
            ok = math.isfinite(value) and (self.least is None or value > self.least
                                           or (value == self.least and not self.above))
            return value if ok else None
        if self.type is str:
            return text if text and (not self.choices or text in self.choices) else None
        value = yaml.safe_load(text)
        if self.type is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        return value if ok else None

    def wants(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.type in (int, float):
            what = "an integer" if self.type is int else "a number"
            return f"{what} above {self.least:g}" if self.above else f"{what} of {self.least:g} or more"
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        return {str: "a string that is not empty", list: "a list of strings, e.g. [module load cuda]",
                dict: "a mapping, e.g. {reservation: mine}"}[self.type]


_TEXT = Arg(str)
# Slurm's: submitit's shared parameters (AutoExecutor._typed_parameters, checked by a test), then the
# slurm_ ones most clusters need; `cluster` picks submitit's executor and `retries` is vitscale's.
LAUNCHER_ARGS: dict[str, dict[str, Arg]] = {
    "local": {},
    "slurm": {
        "cluster": Arg(str, choices=("slurm", "local", "debug")), "retries": Arg(int, 0),
        "name": _TEXT, "timeout_min": Arg(int, 1), "mem_gb": Arg(float, 0, above=True), "nodes": Arg(int, 1),
        "cpus_per_task": Arg(int, 1), "gpus_per_node": Arg(int, 0), "tasks_per_node": Arg(int, 1),
        "stderr_to_stdout": Arg(bool),
        **{f"slurm_{k}": _TEXT for k in ("partition", "account", "qos", "constraint", "exclude", "nodelist",
                                         "gres", "mem", "mem_per_cpu", "mem_per_gpu", "comment", "mail_type",
                                         "mail_user", "dependency", "wckey", "job_name")},
        "slurm_time": Arg(int, 1), "slurm_signal_delay_s": Arg(int, 0),
        "slurm_array_parallelism": Arg(int, 1), "slurm_cpus_per_gpu": Arg(int, 1),
        "slurm_gpus_per_task": Arg(int, 0), "slurm_exclusive": Arg(bool),
        "slurm_use_srun": Arg(bool), "slurm_setup": Arg(list), "slurm_srun_args": Arg(list),
        "slurm_additional_parameters": Arg(dict),
    },
    "ray": {"num_cpus": Arg(int, 1), "num_gpus": Arg(float, 0), "max_retries": Arg(int, -1), "address": _TEXT,
            "ranks": Arg(int, 1), "retries": Arg(int, 0)},
}


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
            with signals.deferred():
                return fn(*args, log=lambda *a, **k: print(*a, flush=True))
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


def options(launcher: str, pairs: tuple[str, ...]) -> dict:
    """launcher_args' KEY=VALUE pairs as typed values, each checked against the launcher's table
    (LAUNCHER_ARGS): one-line UserErrors, before anything is written or started."""
    table = LAUNCHER_ARGS[launcher]
    if pairs and not table:
        raise UserError("launcher_args are for --launcher slurm or ray; the local launcher takes --workers")
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"launcher argument {p!r} is not KEY=VALUE (e.g. timeout_min=240)")
        if key not in table:
            raise UserError(f"launcher arguments for {launcher}: unknown {key}; known: {', '.join(table)}")
        if key in out:
            raise UserError(f"launcher argument {key} is given twice; give it once")
        out[key] = table[key].read(key, value)
    return out


def checked(launcher: str, opts: dict) -> dict:
    """Typed arguments given in code (a test, a library caller) checked as the CLI's pairs are."""
    return options(launcher, tuple(f"{k}={v}" for k, v in opts.items()))


def _cluster(opts: dict) -> str:
    """Submitit's executor: Slurm's where sbatch is; its local or debug one only where named."""
    cluster = opts.pop("cluster", "slurm")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("no Slurm here (sbatch not found): run the study where sbatch is (a Slurm login "
                        "node), or use --launcher local; --launcher-arg cluster=local runs the jobs with "
                        "submitit's local executor on this machine")
    return cluster


def available(study) -> None:
    """Refuse, in one line, a launcher this machine cannot start (its package missing, Slurm without
    sbatch): before the study writes anything."""
    opts = options(study.launcher, study.launcher_args)
    if study.launcher == "slurm":
        optional("submitit", "slurm", "--launcher slurm")
        _cluster(opts)
    elif study.launcher == "ray":
        optional("ray", "ray", "--launcher ray")


def launcher_for(study, workers: int, log, device: str = "auto") -> Launcher:
    """The study's launcher (study.launcher, its launcher_args); jobs' logs stay in their runs.
    `device`: the runs' train.device (a Slurm job of several tasks puts rank r on cuda:r)."""
    opts = options(study.launcher, study.launcher_args)
    if study.launcher == "local":
        return Runner(workers, log)
    retries = opts.pop("retries", 2)
    if study.launcher == "slurm":
        return SlurmLauncher(Path(study.out) / "slurm", opts, retries, log, device=device)
    return RayLauncher(opts, retries, log, device=device)


# ----------------------------------------------------------------------------- slurm
class SlurmTask:
    """One job as a submitit task. Submitit's preemption signal (USR2, sent before a time limit
    or a preemption) is turned into vitscale's SIGUSR1, so the run stops at its next step with a
    checkpoint; then submitit's own handler calls `checkpoint` (the same task again) and requeues.

    A job of several tasks (tasks_per_node, nodes) runs a run's ranks, as torchrun would: the
    study's run functions take their `dist.Dist` last, and get the job's process group there; a
    job without one (the sizing) runs on rank 0 alone."""

    def __init__(self, fn, args: tuple, log_path: Path, threads: int, device: str = "auto"):
        self.fn, self.args, self.log_path, self.threads, self.device = fn, args, log_path, threads, device

    def __call__(self) -> None:
        """Rank 0 writes the job's value as JSON (value_path) for the launcher; submitit pickles what
        this returns (None) beside it, which nothing reads."""
        from submitit import JobEnvironment

        env = JobEnvironment()
        value = self._value(env)
        if env.global_rank == 0:
            atomic_write_text(value_path(env.paths.folder, env.job_id), encode(value))

    def _value(self, env):
        if env.num_tasks == 1:
            return self._run(self.args)
        if not takes_dist(self.args):
            return None if env.global_rank else self._run(self.args)
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return as_rank(self._run, self.args, self.device)

    def _run(self, args: tuple):
        from submitit import JobEnvironment

        usr = JobEnvironment._usr_sig()
        requeue = signal.getsignal(usr)  # submitit's: checkpoint() and requeue
        asked: list[int] = []

        def stop(signum, frame):
            asked.append(signum)
            os.kill(os.getpid(), signal.SIGUSR1)  # noted by vitscale.common.signals: checkpoint, Interrupted

        signal.signal(usr, stop)
        try:
            return run_job(self.fn, args, self.log_path, self.threads)
        except Interrupted:
            if asked and callable(requeue):
                requeue(usr, None)  # requeues this task and exits
            raise
        finally:
            signal.signal(usr, requeue)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)  # the runs resume from their run directories


class _Waiting:
    """Jobs submitted and not yet done, resubmitted up to `retries` times when they fail."""

    def __init__(self, retries: int, log):
        self.retries, self.log = retries, log
        self.pending: dict = {}  # handle -> (name, job tuple, tries)

    def add(self, handle, name: str, job: tuple, tries: int = 0) -> None:
        self.pending[handle] = (name, job, tries)

    def finished(self, handle, value, error: str | None, resubmit) -> tuple[str, object] | None:
        """(name, value) of a finished job; None when it failed and was submitted again."""
        name, job, tries = self.pending.pop(handle)
        if error is not None:
            if tries >= self.retries:
                raise StopTraining(f"{name} failed {tries + 1} times (last: {error}); its log: {job[3]}")
            self.log(f"{name} failed ({error}); submitted again, its runs resume from their checkpoints")
            self.add(resubmit(job), name, job, tries + 1)
            return None
        if isinstance(value, Failed):
            value.raise_()
        return name, value


def _last_line(e: BaseException | str) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def value_path(folder: str | Path, job_id: str) -> Path:
    """Where a Slurm job's value is written as JSON: beside submitit's own files of that job."""
    return Path(folder) / f"{job_id}_value.json"


class SlurmLauncher:
    """Jobs as Slurm job arrays through submitit (its logs under the study's slurm/)."""

    remote = True

    def __init__(self, folder: Path, opts: dict, retries: int, log, poll_s: float = 1.0,
                 device: str = "auto", settle_s: float = 10.0):
        submitit = optional("submitit", "slurm", "--launcher slurm")
        opts = checked("slurm", opts)
        cluster = _cluster(opts)  # "local" or "debug" where named: submitit's executors on this machine
        self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
        self.threads = int(opts.get("cpus_per_task", 1))
        opts = {"name": "vitscale-study", "cpus_per_task": self.threads} | opts
        try:
            self.executor.update_parameters(**opts)
        except (ValueError, TypeError, NameError) as e:
            raise UserError(f"launcher arguments for slurm: {str(e).strip().splitlines()[0]}") from None
        self.log, self.poll_s, self.retries, self.device = log, poll_s, retries, device
        self.settle_s = settle_s
        log(f"launcher slurm ({self.executor.cluster}): {opts}; submitit's logs in {folder}")

    def _submit(self, job: tuple):
        name, fn, args, path = job
        return self.executor.submit(SlurmTask(fn, args, path, self.threads, self.device))

    def map(self, jobs: list[tuple], done) -> None:
        if not jobs:
            return
        waiting = _Waiting(self.retries, self.log)
        with self.executor.batch():  # one job array
            handles = [self._submit(j) for j in jobs]
        for h, j in zip(handles, jobs, strict=True):
            waiting.add(h, j[0], j)
        self.log(f"submitted {len(jobs)} jobs: {', '.join(j[0].split(':')[0] for j in jobs)}")
        try:
            while waiting.pending:
                for h in [h for h in waiting.pending if h.done()]:
                    value, error = self._outcome(h)
                    got = waiting.finished(h, value, error, self._submit)
                    if got is not None:
                        done(*got)
                signals.check("while waiting for the study's Slurm jobs (cancelled: their runs stop at a "
                              "checkpoint)")
                time.sleep(self.poll_s)
        except BaseException:  # a signal here, or a job's error: the others stop too, checkpointed
            for h in waiting.pending:
                h.cancel(check=False)
            raise

    def _outcome(self, h) -> tuple[object, str | None]:
        """A finished job's (value, None) from the JSON its rank 0 wrote, or (None, the last line of
        its error log) where it wrote none: it failed or was killed. Submitit's result pickle is never
        loaded. A job killed outright leaves no result pickle: its JSON is waited for `settle_s`, as
        a shared file system may show a file late."""
        path = value_path(h.paths.folder, h.job_id)
        deadline = time.monotonic() + self.settle_s
        while not path.is_file() and not h.paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(min(self.poll_s, 0.5))
        if path.is_file():
            try:
                return decode(path.read_text()), None
            except (OSError, ValueError) as e:
                return None, f"job {h.job_id}: its value {path} cannot be read ({_last_line(e)})"
        return None, f"job {h.job_id}: {_last_line(h.stderr() or 'no output (killed?)')}"

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- ray
class RayLauncher:
    """Jobs as Ray remote tasks on the cluster at `address` (default: one ray.init would join or
    start), each with num_cpus (its torch threads) and num_gpus, retried when its worker dies."""

    remote = True

    def __init__(self, opts: dict, retries: int, log, device: str = "auto"):
        opts = checked("ray", opts)  # before Ray starts
        ray = optional("ray", "ray", "--launcher ray")
        self.ranks = opts.get("ranks", 1)
        if not ray.is_initialized():
            ray.init(address=opts.get("address"), log_to_driver=False)
        self.threads = int(opts.get("num_cpus", 1))
        self.ray, self.log, self.retries, self.device = ray, log, retries, device
        self.remote_job = ray.remote(run_ranks).options(
            num_cpus=self.threads, num_gpus=opts.get("num_gpus", 0), max_retries=opts.get("max_retries", 3))
        log(f"launcher ray: {self.threads} CPUs and {opts.get('num_gpus', 0)} GPUs a job"
            + (f", {self.ranks} ranks a run" if self.ranks > 1 else ""))

    def _submit(self, job: tuple):
        name, fn, args, path = job
        return self.remote_job.remote(fn, args, str(path), self.threads, self.ranks, self.device)

    def map(self, jobs: list[tuple], done) -> None:
        waiting = _Waiting(self.retries, self.log)
        for j in jobs:
            waiting.add(self._submit(j), j[0], j)
        try:
            while waiting.pending:
                ready, _ = self.ray.wait(list(waiting.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    try:
                        value, error = self.ray.get(ref), None
                    except Exception as e:  # noqa: BLE001 (a task that failed beyond Ray's retries)
                        value, error = None, _last_line(e)
                    got = waiting.finished(ref, value, error, self._submit)
                    if got is not None:
                        done(*got)
                signals.check("while waiting for the study's Ray tasks (cancelled: their runs stop at a "
                              "checkpoint)")
        except BaseException:  # a signal here, or a task's error: the others stop too (SIGINT: checkpointed)
            for ref in waiting.pending:
                self.ray.cancel(ref)
            raise

    def close(self) -> None:
        pass
