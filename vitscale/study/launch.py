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

`jobs` runs one job on its node and carries its value back as JSON; `launch_args` checks the
launchers' arguments; `slurm` is the Slurm launcher; the Ray launcher is here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from vitscale.common import signals
from vitscale.common.errors import optional
from vitscale.study.jobs import Waiting, last_line, run_ranks
from vitscale.study.launch_args import checked, cluster, options
from vitscale.study.pool import Runner
from vitscale.study.slurm import SlurmLauncher

logger = logging.getLogger(__name__)


class Launcher(Protocol):
    threads: int  # torch threads of each job
    remote: bool  # jobs run in processes of their own, maybe on other machines

    def map(self, jobs: list[tuple], done) -> None: ...

    def close(self) -> None: ...


def available(study) -> None:
    """Refuse, in one line, a launcher this machine cannot start (its package missing, Slurm without
    sbatch): before the study writes anything."""
    opts = options(study.launcher, study.launcher_args)
    if study.launcher == "slurm":
        optional("submitit", "slurm", "--launcher slurm")
        cluster(opts)
    elif study.launcher == "ray":
        optional("ray", "ray", "--launcher ray")


def launcher_for(study, workers: int, device: str = "auto") -> Launcher:
    """The study's launcher (study.launcher, its launcher_args); jobs' logs stay in their runs.
    `device`: the runs' train.device (a Slurm job of several tasks puts rank r on cuda:r)."""
    opts = options(study.launcher, study.launcher_args)
    if study.launcher == "local":
        return Runner(workers)
    retries = opts.pop("retries", 2)
    if study.launcher == "slurm":
        return SlurmLauncher(Path(study.out) / "slurm", opts, retries, device=device)
    return RayLauncher(opts, retries, device=device)


# ----------------------------------------------------------------------------- ray
class RayLauncher:
    """Jobs as Ray remote tasks on the cluster at `address` (default: one ray.init would join or
    start), each with num_cpus (its torch threads) and num_gpus, retried when its worker dies."""

    remote = True

    def __init__(self, opts: dict, retries: int, device: str = "auto"):
        opts = checked("ray", opts)  # before Ray starts
        ray = optional("ray", "ray", "--launcher ray")
        self.ranks = opts.get("ranks", 1)
        if not ray.is_initialized():
            ray.init(address=opts.get("address"), log_to_driver=False)
        self.threads = int(opts.get("num_cpus", 1))
        self.ray, self.retries, self.device = ray, retries, device
        self.remote_job = ray.remote(run_ranks).options(
            num_cpus=self.threads, num_gpus=opts.get("num_gpus", 0), max_retries=opts.get("max_retries", 3))
        logger.info(f"launcher ray: {self.threads} CPUs and {opts.get('num_gpus', 0)} GPUs a job"
                    + (f", {self.ranks} ranks a run" if self.ranks > 1 else ""))

    def _submit(self, job: tuple):
        name, fn, args, path = job
        return self.remote_job.remote(fn, args, str(path), self.threads, self.ranks, self.device)

    def map(self, jobs: list[tuple], done) -> None:
        waiting = Waiting(self.retries)
        for j in jobs:
            waiting.add(self._submit(j), j[0], j)
        try:
            while waiting.pending:
                ready, _ = self.ray.wait(list(waiting.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    try:
                        value, error = self.ray.get(ref), None
                    except Exception as e:  # noqa: BLE001 (a task that failed beyond Ray's retries)
                        value, error = None, last_line(e)
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
