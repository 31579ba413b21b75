"""Where the library's messages go: Python `logging`, under the "vitscale" logger.

Library modules log with `logging.getLogger(__name__)` and never print. A program that uses
vitscale decides where the lines go; the CLI calls `setup` once:

    logs.setup()              # lines on stdout, warnings on stderr (rich on a terminal)
    logs.setup(stderr=True)   # where stdout carries data (--json, predictions): all on stderr

Without `setup` (a notebook, a script), the library is quiet below WARNING, as any library is;
`logs.setup()` or `logging.basicConfig(level=logging.INFO)` shows its progress.

A warning reads "warning: ..." as the CLI always wrote it. Plain text when the stream is not a
terminal, so a worker's log.txt and a piped run hold one line per message, unwrapped.
"""

from __future__ import annotations

import contextlib
import logging
import sys

ROOT = "vitscale"
_CONSOLES: dict = {}  # stderr? -> the one rich console of that stream


class Prefix(logging.Formatter):
    """The message itself; a warning or error says which it is in front."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


class _Current(logging.StreamHandler):
    """Writes to whatever sys.stdout (or sys.stderr) is when a line is logged, not when the
    handler was made: a pool worker points them at its log file, pytest at its capture."""

    def __init__(self, stderr: bool):
        self.stderr = stderr
        super().__init__()

    @property
    def stream(self):
        return sys.stderr if self.stderr else sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def _handler(stderr: bool, rich: bool) -> logging.Handler:
    if not rich:
        return _Current(stderr)
    # local: rich is only needed on a terminal (a worker's log file takes plain lines)
    from rich.console import Console
    from rich.logging import RichHandler

    _CONSOLES[stderr] = _CONSOLES.get(stderr) or Console(stderr=stderr)
    return RichHandler(console=_CONSOLES[stderr], show_time=False, show_level=False, show_path=False,
                       markup=False, rich_tracebacks=False)


def console():
    """The rich console the info lines go to (a progress bar drawn on it stays below them),
    or a new one on stdout where `setup` chose none."""
    from rich.console import Console  # local: as in _handler

    for h in logging.getLogger(ROOT).handlers:
        if getattr(h, "vitscale", False) and h.level < logging.WARNING and hasattr(h, "console"):
            return h.console
    return Console()


def setup(stderr: bool = False, rich: bool | None = None, level: int = logging.INFO) -> None:
    """Send the "vitscale" logger's lines at `level` and above to stdout (to stderr with `stderr`:
    where stdout carries data), its warnings and errors to stderr, each through rich where its
    stream is a terminal (`rich` forces either). Calling it again replaces the handlers it added
    before, so a worker process can call it for its own log."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if getattr(h, "vitscale", False)]:
        logger.removeHandler(h)
    for to_stderr, warnings in ((stderr, False), (True, True)):
        stream = sys.stderr if to_stderr else sys.stdout
        handler = _handler(to_stderr, stream.isatty() if rich is None else rich)
        if warnings:
            handler.setLevel(logging.WARNING)
        else:
            handler.addFilter(lambda record: record.levelno < logging.WARNING)
        handler.setFormatter(Prefix("%(message)s"))
        handler.vitscale = True
        logger.addHandler(handler)
    logger.setLevel(level)


@contextlib.contextmanager
def plain():
    """For the block, the lines go as plain text to sys.stdout (a job's log file), whatever
    `setup` chose before; restored after (a Ray worker runs one job after another)."""
    logger = logging.getLogger(ROOT)
    handlers, level = logger.handlers[:], logger.level
    setup(rich=False)
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


@contextlib.contextmanager
def quiet(when: bool = True):
    """Only errors from the "vitscale" logger while inside (when `when`): a run's ranks other
    than the main one, which would repeat its lines."""
    logger = logging.getLogger(ROOT)
    before = logger.level
    if when:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)
