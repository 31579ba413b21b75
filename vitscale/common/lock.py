"""One writer per directory: a run directory, a study directory (or a study's trial).

    DIR/.lock   {"pid": 4242, "host": "node7", "started": 1718000000.0, "birth": "123456"}

The lock file appears whole or not at all (written aside, then hard-linked into place,
which fails if one exists). A lock whose process is gone from this host (no such PID, or
a PID since reused by another process: `birth` is the process's start time) is stale and
taken over with a note; a live one, or one held on another host (which this host cannot
check), is refused in one line that says what to do. Under torchrun rank 0 holds the lock
for every rank, and every rank learns whether it got it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from vitscale.common import dist
from vitscale.common.errors import UserError

logger = logging.getLogger(__name__)

NAME = ".lock"


def _birth(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; the name (field 2) may hold spaces


def _alive(holder: dict) -> bool:
    """Is the process a lock names still running (on this host)?"""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    birth = _birth(pid)
    return not (birth and holder.get("birth") and birth != holder["birth"])


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(path: Path, record: dict) -> bool:
    """Create the lock file holding `record` if none exists (atomically); False if one does."""
    aside = path.with_name(f"{path.name}.{record['host']}.{record['pid']}")
    aside.write_text(json.dumps(record))
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create instead
        try:
            with open(path, "x") as f:
                f.write(json.dumps(record))
            return True
        except FileExistsError:
            return False
    finally:
        aside.unlink(missing_ok=True)


def _remove_stale(path: Path, holder: dict) -> None:
    """Move a stale lock out of the way, unless another process replaced it meanwhile."""
    grave = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return  # someone else removed it first
    if _read(grave) != holder:  # we moved a fresh lock taken since we looked: put it back
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["started"])) if isinstance(
        holder.get("started"), (int, float)) else "an unknown time"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {since})"


def acquire(directory: Path, what: str = "directory") -> Path:
    """Take `directory`'s lock (creating the directory); UserError if another process holds it."""
    path = Path(directory) / NAME
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.time(), "birth": _birth(os.getpid())}
    for _ in range(5):
        if _create(path, record):
            return path
        holder = _read(path)
        if not holder:  # unreadable: a lock from a crashed write, or one being replaced just now
            time.sleep(0.2)
            if _read(path):
                continue
        elif holder.get("host") != host:
            raise UserError(f"{what} {str(directory)!r} is in use by {_describe(holder)}; if that process "
                             f"has ended, delete {path}, else wait for it or choose another --out")
        elif _alive(holder):
            raise UserError(f"{what} {str(directory)!r} is in use by {_describe(holder)}; wait for it to "
                             "finish (or stop it), or choose another --out")
        _remove_stale(path, holder)
        logger.info(f"{path}: its holder, {_describe(holder)}, is gone; taking it over" if holder else
                    f"{path} could not be read; taking it over")
    raise UserError(f"could not take the lock {path}: other processes keep taking it; "
                    "run one process per --out")


def release(path: Path) -> None:
    """Give the lock back (only if it is still this process's)."""
    if _read(path).get("pid") == os.getpid() and _read(path).get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(directory: str | Path, d: dist.Dist, what: str = "directory"):
    """Hold `directory`'s lock for the block: rank 0 takes it (making the directory), every
    rank raises the same UserError if it could not. A directory this made and the block
    left empty is removed again (a run refused before it wrote anything leaves nothing)."""
    directory = Path(directory)
    made = not directory.exists()
    path = None

    def take() -> Path:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return acquire(directory, what)
        except OSError as e:
            raise UserError(f"cannot write to {what} {str(directory)!r}: {e.strerror}; "
                             "choose another --out") from None

    path = dist.on_main(d, take)
    try:
        yield path
    finally:
        if d.main and path is not None:
            release(path)
            if made:
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if empty
