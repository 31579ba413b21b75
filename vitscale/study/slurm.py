"""Slurm as a study's launcher: each job one task of a job array, through submitit.

A task Slurm preempts or times out (its USR2 before the end) stops at a checkpoint and is
requeued with the same arguments, and a task that dies is resubmitted (`retries`): both resume
from their run directories, as every vitscale run does. A job of several tasks (tasks_per_node,
nodes) is one run's ranks, joined as torchrun would join them.

A job's value comes back as JSON (jobs.encode), never as a pickle read here. Submitit itself runs
each job from the pickle it writes in the study's slurm/ folder (`*_submitted.pkl`, loaded on the
node by submitit): whoever can write that folder can run code as the study's jobs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from vitscale.common import compat, signals
from vitscale.common.errors import Interrupted, UserError, optional
from vitscale.common.io import atomic_write_text
from vitscale.study.jobs import Waiting, as_rank, decode, encode, last_line, run_job, takes_dist
from vitscale.study.launch_args import checked, cluster

logger = logging.getLogger(__name__)


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
        usr = compat.submitit_requeue_signal()
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


def value_path(folder: str | Path, job_id: str) -> Path:
    """Where a Slurm job's value is written as JSON: beside submitit's own files of that job."""
    return Path(folder) / f"{job_id}_value.json"


class SlurmLauncher:
    """Jobs as Slurm job arrays through submitit (its logs under the study's slurm/)."""

    remote = True

    def __init__(self, folder: Path, opts: dict, retries: int, poll_s: float = 1.0,
                 device: str = "auto", settle_s: float = 10.0):
        submitit = optional("submitit", "slurm", "--launcher slurm")
        opts = checked("slurm", opts)
        where = cluster(opts)  # "local" or "debug" where named: submitit's executors on this machine
        self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=where)
        self.threads = int(opts.get("cpus_per_task", 1))
        opts = {"name": "vitscale-study", "cpus_per_task": self.threads} | opts
        try:
            self.executor.update_parameters(**opts)
        except (ValueError, TypeError, NameError) as e:
            raise UserError(f"launcher arguments for slurm: {str(e).strip().splitlines()[0]}") from None
        self.poll_s, self.retries, self.device = poll_s, retries, device
        self.settle_s = settle_s
        logger.info(f"launcher slurm ({self.executor.cluster}): {opts}; submitit's logs in {folder}")

    def _submit(self, job: tuple):
        name, fn, args, path = job
        return self.executor.submit(SlurmTask(fn, args, path, self.threads, self.device))

    def map(self, jobs: list[tuple], done) -> None:
        if not jobs:
            return
        waiting = Waiting(self.retries)
        with self.executor.batch():  # one job array
            handles = [self._submit(j) for j in jobs]
        for h, j in zip(handles, jobs, strict=True):
            waiting.add(h, j[0], j)
        logger.info(f"submitted {len(jobs)} jobs: {', '.join(j[0].split(':')[0] for j in jobs)}")
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
                return None, f"job {h.job_id}: its value {path} cannot be read ({last_line(e)})"
        return None, f"job {h.job_id}: {last_line(h.stderr() or 'no output (killed?)')}"

    def close(self) -> None:
        pass

