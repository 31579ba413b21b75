"""Stop at a safe point when asked to: SIGINT (Ctrl-C), SIGTERM (a scheduler or `kill`) and
SIGUSR1 (what Slurm sends before a time limit with --signal=USR1@SECONDS).

Inside `deferred()` these signals only note that they came; the training loop looks after
each step (`received`), writes a checkpoint and raises `errors.Interrupted`, which the CLI
turns into one line and exit code 4. A second signal is noted like the first (a hard stop
is SIGKILL's job), so a signal sent to a whole process group and forwarded as well stops
each process once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from vitscale.common.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # signals noted since the outermost deferred() began
_forward: list = []  # callables giving the PIDs to pass a signal on to (a pool's workers)
_depth = 0
_count = 0  # signals noted in this process's life, repeats too


def _note(signum: int, frame) -> None:
    global _count
    _count += 1
    if signum not in _received:
        _received.append(signum)
    for pids in _forward:
        for pid in pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)


def received() -> str | None:
    """The name of the first signal noted (e.g. "SIGTERM"), None if none came."""
    return signal.Signals(_received[0]).name if _received else None


def count() -> int:
    """How many signals were noted so far (repeats too): one that came after a moment is
    `count() > the count then` (an evaluation stops for a signal that came while it ran)."""
    return _count


def check(what: str) -> None:
    """Raise Interrupted (`what` says how to continue) if a signal came."""
    if _received:
        raise Interrupted(f"stopped by {received()}; {what}")


@contextlib.contextmanager
def deferred(forward=None):
    """Within the block, SIGINT / SIGTERM / SIGUSR1 are noted instead of ending the process;
    `forward()` gives PIDs (a pool's workers) each signal is passed on to. Outside the main
    thread (where signals cannot be caught) the block runs unchanged."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _note) for s in SIGNALS}
    if forward is not None:
        _forward.append(forward)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if forward is not None:
            _forward.remove(forward)
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if _depth == 0:
            _received.clear()


def defer_forever() -> None:
    """Note the signals for the rest of this process's life (a pool's worker process: the
    job it runs, or its next one, stops at its first step)."""
    global _depth
    for s in SIGNALS:
        signal.signal(s, _note)
    _depth += 1


def ignore(*_) -> None:
    """Leave the signals to the parent process (a data-loading worker: the trainer stops it)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
