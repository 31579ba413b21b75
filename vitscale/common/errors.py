"""What went wrong, told apart: a user's mistake, a stop, or a bug.

`UserError`: something the user can fix (a flag, a config field, a file, a run directory).
The CLI prints its message as one line and exits 2. It subclasses ValueError so that code
validating values reads naturally, but only UserError (never a bare ValueError, which may
come from torch or from a bug) reaches the user as a mistake of theirs.

`StopTraining`: training cannot go on (a non-finite loss: `NotFinite`); exit 3.
`Interrupted`: a signal asked training to stop; a checkpoint was written; exit 4.

Anything else is a bug: the CLI prints one short line, writes the traceback to a file
(the run directory's `crash.txt` when one is open, see `crash_dir`) and exits 1.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import traceback
from pathlib import Path

EXIT_USER, EXIT_STOPPED, EXIT_INTERRUPTED, EXIT_BUG = 2, 3, 4, 1


class UserError(ValueError):
    """A mistake the user can fix; the message names the field or file and what to do."""


class StopTraining(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to do."""


class NotFinite(StopTraining):
    """The loss became NaN or infinite: most often a learning rate too high for the model."""


class Interrupted(RuntimeError):
    """A signal stopped training after a checkpoint; the message says how to resume."""


def optional(module: str, extra: str, what: str):
    """Import an optional package, or raise a UserError saying that `what` needs it and which
    extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module}: pip install 'vitscale[{extra}]'") from None


_crash_dir: Path | None = None


def crash_dir(path: str | Path | None) -> None:
    """Where a bug's traceback goes from now on (the open run or study directory)."""
    global _crash_dir
    _crash_dir = Path(path) if path is not None else None


def write_crash(exc: BaseException) -> Path:
    """Write `exc`'s traceback beside the work it interrupted (or in the temp dir); its path."""
    text = "".join(traceback.format_exception(exc))
    for folder in (_crash_dir, Path(tempfile.gettempdir())):
        if folder is None:
            continue
        path = folder / ("crash.txt" if folder == _crash_dir else f"vitscale-crash-{os.getpid()}.txt")
        try:
            path.write_text(text)
            return path
        except OSError:
            continue
    raise exc
