"""Two gloo ranks for a test: rank 0 in the test's own process (no torch to import again), rank 1
a process of its own, in the environment torchrun gives its ranks (RANK, WORLD_SIZE, MASTER_ADDR,
...). Against torchrun and its two ranks, two Python processes fewer a launch (~12 s of CPU).
For tests whose subject is the ranks, not torchrun: tests/train/test_signals_and_ranks.py keeps a
run under torchrun itself (a signal to one rank of its agent)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from datetime import timedelta

import pytest
import torch.distributed as td

from vitscale.cli import main
from vitscale.common import dist

ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
VITSCALE = [sys.executable, "-m", "vitscale"]


def rank_env(rank: int, port: int, n: int = 2) -> dict[str, str]:
    """What torchrun --standalone tells rank `rank` of `n`."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def free_port() -> int:
    """A TCP port free now, for rank 0's store (torchrun --standalone picks one the same way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vitscale_here(*args: str, capsys=None) -> str:
    """`vitscale ARGS` on 2 gloo ranks, rank 0 `main(ARGS)` in this process, rank 1 a process of its
    own: their output once both ended well (rank 0's read from `capsys` when given)."""
    return here_and_apart(lambda: main(list(args)), [*VITSCALE, *args], capsys)


def here_and_apart(rank_0, command: list[str], capsys=None) -> str:
    """rank_0() (its exit status, None for 0) as rank 0 of 2 gloo ranks in this process, in
    torchrun's environment, and `command` as rank 1 in a process of its own: their output once both
    ended well (rank 0's read from `capsys` when given)."""
    port, log = free_port(), tempfile.TemporaryFile("w+")  # noqa: SIM115
    other = subprocess.Popen(command, text=True, env=ENV | rank_env(1, port), stdout=log,
                             stderr=subprocess.STDOUT)
    with pytest.MonkeyPatch.context() as m:
        for k, v in rank_env(0, port).items():
            m.setenv(k, v)
        # a rank whose peer died gives up after 3 minutes instead of dist's 30
        m.setattr(dist, "TIMEOUT", timedelta(minutes=3))
        code = None
        try:
            code = rank_0() or 0
        finally:
            if td.is_initialized():  # left by a failure: the next test's runs would join it
                td.destroy_process_group()
            if code != 0 and other.poll() is None:
                other.kill()
    mine = "" if capsys is None else "".join(capsys.readouterr())
    other.wait(timeout=300)
    log.seek(0)
    theirs = log.read()
    log.close()
    assert code == 0 and other.returncode == 0, f"exit {code}, rank 1 {other.returncode}:\n{theirs[-6000:]}"
    return mine + theirs


def rank_0_here(function, *args: str) -> None:
    """`function(rank, *args)`, a test module's function, as rank 0 in this process (no torch to
    import again) and as rank 1 in a process of its own; it fails if either rank does."""
    here, name = os.path.split(sys.modules[function.__module__].__file__)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path[:0] = [{here!r}, {tests!r}]; "
            f"from {name.removesuffix('.py')} import {function.__name__} as f; f(1, *sys.argv[1:])")
    other = subprocess.Popen([sys.executable, "-c", code, *args], env=ENV)
    try:
        function(0, *args)
    except BaseException:
        other.kill()
        other.wait()
        raise
    assert other.wait(timeout=300) == 0, "rank 1 failed: its output is above"
