"""Writes a kill cannot cut in half: a temporary file, fsynced, renamed over the old one.

Every file vitscale publishes (a run's config.yaml, final.json and metrics.jsonl, a study's
results, checkpoints' directories) goes through these, so a reader finds the old file or the
new one, never part of one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (before a rename publishes them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave the old file, not a cut temporary one
        raise
    os.replace(tmp, path)
    fsync(path.parent)
