"""What a directory vitscale writes its work into may be: the one rule for --out.

A run (train, pretrain, finetune, linprobe, distill, a soup) or a study writes only into its own
directory. That directory is new, empty, or already holds that kind of work (a run's config.yaml:
it resumes; a study's study.yaml: it continues). Anything else is refused in one line before a byte
is written: the filesystem root, a home directory, a file, or a folder that holds other things
(`--out .` in a source tree, `--out ~`). A run directory is never inside the data it trains on
(the next scan of that folder would take the run for a class), and a data scan passes over
folders that hold work (`holds_work`).
"""

from __future__ import annotations

from pathlib import Path

from vitscale.common.errors import UserError

# The files of a run directory (vitscale.train.rundir.RunDir opens one) and of a study's.
RUN = "config.yaml"  # the run's resolved config: what marks a run directory (written when it starts)
METRICS = "metrics.jsonl"  # every training and evaluation row, one JSON object a line
FINAL = "final.json"  # the metrics of the run's last step, beside that step and the best score
BEST = "best"  # the checkpoint validation chose, a directory like each ckpt-STEP/
SOUP = "soup.json"  # a soup's metrics of every ingredient and soup (the soup is a run: best/)
STUDY = "study.yaml"  # the study's config: what marks a study directory
# What a process leaves in a directory while it holds it (vitscale.common.lock's .lock, the write probe,
# log.txt, which a study's worker opens in a trial's or sweep run's directory before the run writes
# its config, and the config's own temporary, left by a kill before its rename; common.io): a folder
# with only these in it is as good as empty.
TRANSIENT = {".lock", ".write-test", "log.txt", RUN + ".tmp", STUDY + ".tmp"}
SCANNED = ("image-folder", "video-folder")  # data read from every file under a folder


def holds_work(folder: Path) -> bool:
    """Whether `folder` holds a run or a study (its config.yaml or study.yaml)."""
    return (folder / RUN).is_file() or (folder / STUDY).is_file()


def _home() -> Path | None:
    """The user's home directory, None where none is known."""
    try:
        return Path.home().resolve()
    except RuntimeError:
        return None


def _expanded(path: str | Path) -> Path:
    """`path` with a leading ~ expanded, resolved (as it is where no such user is known)."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:
        return Path(path).resolve()


def _is_empty(folder: Path) -> bool:
    return all(entry.name in TRANSIENT for entry in folder.iterdir())


def check_out(out: str | Path, what: str = "run", marker: str | None = RUN) -> Path:
    """Refuse, in one line, `out` as the directory of a `what` ("run", "study", "soup") unless it
    is new, empty, or holds `marker` (None: nothing may be there yet). Writes nothing; the path."""
    path = Path(out)
    where = path.resolve()
    if where == Path(where.anchor):
        raise UserError(f"--out {str(out)!r} is the filesystem root; give the {what} a folder of its own, "
                         f"e.g. --out runs/NAME")
    if _home() in (where, _expanded(out)):  # also a "~" the shell left as it was (--out=~)
        raise UserError(f"--out {str(out)!r} is your home directory; give the {what} a folder of its own, "
                         f"e.g. --out runs/NAME")
    if not path.exists():
        return path
    if not path.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a folder; give the {what} a new folder")
    try:
        if _is_empty(path):
            return path
    except OSError as e:
        raise UserError(f"cannot read --out {str(out)!r}: {e.strerror}; choose another --out") from None
    if marker is None:
        kind = next((k for f, k in ((SOUP, "a soup"), (RUN, "a run"), (STUDY, "a study"))
                     if (path / f).is_file()), None)
        again = f" (or delete that {kind[2:]} to make it again)" if kind else ""
        raise UserError(f"--out {str(out)!r} already holds {kind or 'files'}; give the {what} a new or empty "
                         f"folder{again}")
    if not (path / marker).is_file():
        raise UserError(f"--out {str(out)!r} is a folder that holds other files and no {what} (no {marker}); "
                         f"give the {what} a new or empty folder")
    return path


def check_outside(out: str | Path, data) -> None:
    """Refuse `out` inside (or equal to) a folder the data config `data` scans for its files
    (data.path, val_path, test_path of the SCANNED kinds; a video list or shards are files)."""
    if data.name not in SCANNED:
        return
    where = Path(out).resolve()  # where the run writes (a run directory's path is taken as given)
    for field in ("path", "val_path", "test_path"):
        folder = getattr(data, field)
        if not folder or not _expanded(folder).is_dir():
            continue
        root = _expanded(folder)
        if where == root or root in where.parents:
            raise UserError(f"--out {str(out)!r} is inside data.{field} ({folder}): the next scan of that "
                             "folder would read the run as data; put runs outside the data, e.g. "
                             "--out runs/NAME")
