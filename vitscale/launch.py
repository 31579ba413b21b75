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
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml

from vitscale import dist, signals
from vitscale.errors import Interrupted, StopTraining, UserError, optional
from vitscale.pool import Runner


class Launcher(Protocol):
    threads: int  # torch threads of each job
    remote: bool  # jobs run in processes of their own, maybe on other machines

    def map(self, jobs: list[tuple], done) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Failed:
    """A job's UserError or StopTraining, carried back to be raised where the study runs."""

    kind: str
    message: str

    def raise_(self) -> None:
        raise (UserError if self.kind == "UserError" else StopTraining)(self.message)


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
        out = Path(tmp) / "rank0.pt"
        torch.multiprocessing.start_processes(
            _rank, args=(fn, args, str(log_path), max(1, threads // ranks), device, ranks, port, str(out)),
            nprocs=ranks, start_method="spawn")  # raises when a rank fails: the task fails, and is run again
        return torch.load(out, weights_only=False)


def _rank(local: int, fn, args: tuple, log_path: str, threads: int, device: str, world: int, port: int,
          out: str) -> None:
    os.environ.update(RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    value = as_rank(lambda a: run_job(fn, a, log_path, threads), args, device)
    if local == 0:
        torch.save(value, out)


def options(pairs: tuple[str, ...]) -> dict:
    """launcher_args' KEY=VALUE pairs, values read as YAML scalars (240 an int, gpu a string)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise UserError(f"launcher argument {p!r} is not KEY=VALUE (e.g. timeout_min=240)")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def launcher_for(study, workers: int, log, device: str = "auto") -> Launcher:
    """The study's launcher (study.launcher, its launcher_args); jobs' logs stay in their runs.
    `device`: the runs' train.device (a Slurm job of several tasks puts rank r on cuda:r)."""
    opts = options(study.launcher_args)
    if study.launcher == "local":
        if opts:
            raise UserError("launcher_args are for --launcher slurm or ray; the local launcher takes "
                            "--workers")
        return Runner(workers, log)
    retries = opts.pop("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise UserError(f"launcher argument retries must be 0 or more, got {retries!r}")
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

    def __call__(self):
        from submitit import JobEnvironment

        env = JobEnvironment()
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
            os.kill(os.getpid(), signal.SIGUSR1)  # noted by vitscale.signals: checkpoint, Interrupted

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


def _last_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


class SlurmLauncher:
    """Jobs as Slurm job arrays through submitit (its logs under the study's slurm/)."""

    remote = True

    def __init__(self, folder: Path, opts: dict, retries: int, log, poll_s: float = 1.0,
                 device: str = "auto"):
        submitit = optional("submitit", "slurm", "--launcher slurm")
        cluster = opts.pop("cluster", None)  # "local" or "debug": submitit's executors for tests
        self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
        self.threads = int(opts.get("cpus_per_task", 1))
        opts = {"name": "vitscale-study", "cpus_per_task": self.threads} | opts
        try:
            self.executor.update_parameters(**opts)
        except (ValueError, TypeError, NameError) as e:
            raise UserError(f"launcher arguments for slurm: {str(e).strip().splitlines()[0]}") from None
        self.log, self.poll_s, self.retries, self.device = log, poll_s, retries, device
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
                    try:
                        value, error = h.results()[0], None  # rank 0's (a job of several tasks)
                    except Exception as e:  # noqa: BLE001 (a failed or killed task: its error's last line)
                        value, error = None, f"job {h.job_id}: {_last_line(e)}"
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

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- ray
class RayLauncher:
    """Jobs as Ray remote tasks on the cluster at `address` (default: one ray.init would join or
    start), each with num_cpus (its torch threads) and num_gpus, retried when its worker dies."""

    remote = True

    def __init__(self, opts: dict, retries: int, log, device: str = "auto"):
        ray = optional("ray", "ray", "--launcher ray")
        unknown = set(opts) - {"num_cpus", "num_gpus", "max_retries", "address", "ranks"}
        if unknown:
            raise UserError(f"launcher arguments for ray: unknown {', '.join(sorted(unknown))}; "
                            "use num_cpus, num_gpus, ranks, max_retries, address, retries")
        self.ranks = opts.get("ranks", 1)
        if not isinstance(self.ranks, int) or self.ranks < 1:
            raise UserError(f"launcher argument ranks must be 1 or more (processes a run), got "
                            f"{self.ranks!r}")
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
