"""Jobs run in this process or in a pool of spawned worker processes, each with its share
of the threads and its output in a log file of its own (the study's trials and sweep).

A signal (vitscale.common.signals) reaches the workers too, from the process group or passed on
from here: their runs stop at a checkpoint, no further job starts, and `map` raises
Interrupted."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from vitscale.common import compat, logs, signals

logger = logging.getLogger(__name__)


def _in_worker(fn, args: tuple, log_path: Path, threads: int):
    """A worker process: its share of the threads, its output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a")  # noqa: SIM115 (held for the job's life)
    sys.stdout.flush()
    os.dup2(log_file.fileno(), sys.stdout.fileno())
    os.dup2(log_file.fileno(), sys.stderr.fileno())
    torch.set_num_threads(threads)
    logs.setup(rich=False)  # a fresh process: its lines, plain, into its log file
    return fn(*args)


class Runner:
    """Runs jobs (fn, args, log path) in this process, or in a pool of spawned workers."""

    remote = False  # launch.Launcher: jobs on this machine

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, torch.get_num_threads() // workers)
        self.pool = None
        if workers > 1:
            ctx = torch.multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=signals.defer_forever)
            logger.info(f"{workers} workers x {self.threads} threads; each run logs to log.txt in its "
                        "directory")

    def map(self, jobs: list[tuple], done) -> None:
        """Run (name, fn, args, log_path) jobs; done(name, value) as each finishes."""
        if self.pool is None or len(jobs) <= 1:
            for i, (name, fn, args, _) in enumerate(jobs, 1):
                signals.check(f"before {name}")
                logger.info(f"[{i}/{len(jobs)}] {name}")
                done(name, fn(*args))
            return
        with signals.deferred(forward=self._pids):
            futures = {self.pool.submit(_in_worker, fn, args, path, self.threads): name
                       for name, fn, args, path in jobs}
            for f in as_completed(futures):
                done(futures[f], f.result())
                signals.check(f"after {futures[f]}")

    def _pids(self) -> list[int]:
        """The workers' process ids (to pass a signal on to)."""
        return compat.pool_pids(self.pool)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)  # jobs not started yet, after an error
