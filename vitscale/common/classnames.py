"""A run's class names: RUN/classes.json, a JSON list of names in class-id order.

Every run writes it when it starts (the data's names: a folder's class subfolders, a video
list's ids "0", "1", ..., the built-ins' digits or directions; [] for unlabelled data), so what
is done with the run later (predict, eval, export, convert) names its classes. A run made
before vitscale saved them has none: its classes read as "0" .. "N-1", and `missing` says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text

FILE = "classes.json"
_FIX = "remove it (classes are then named by their ids) or put back the run's own"


def write(run_dir: Path, names: tuple[str, ...]) -> bool:
    """Save `names` as RUN/classes.json where it does not already hold them; True if written."""
    path = Path(run_dir) / FILE
    text = json.dumps(list(names), ensure_ascii=False, indent=1) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return False
    atomic_write_text(path, text)
    return True


def read(run_dir: Path, count: int) -> tuple[tuple[str, ...], bool]:
    """(the names of a run's `count` classes, whether the run saved them): RUN/classes.json, else
    "0" .. "count-1". A file that is no list of `count` names is refused in one line. A model of
    no classes (an MAE, whatever its data's labels) has no names to read: ((), True)."""
    path = Path(run_dir) / FILE
    if not count:
        return (), True
    if not path.is_file():
        return ids(count), False
    try:
        names = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({str(e).splitlines()[0]}); {_FIX}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path} is not a JSON list of class names; {_FIX}")
    if len(names) != count:
        raise UserError(f"{path} names {len(names)} classes, the model has {count} outputs; {_FIX}")
    return tuple(names), True


def ids(count: int) -> tuple[str, ...]:
    """The names of `count` classes nobody named: "0" .. "count-1"."""
    return tuple(str(i) for i in range(count))


def missing(run_dir: Path, count: int) -> str:
    """The line that says a run's classes are shown by id (it has no classes.json)."""
    return (f"{run_dir} has no {FILE} (it was trained before vitscale saved class names): its "
            f"{count} classes are named by their ids 0..{count - 1}")


def shown(names: tuple[str, ...], most: int = 10) -> str:
    """'cat, dog, ...' with at most `most` names and the count."""
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return ", ".join(names[:most]) + more
