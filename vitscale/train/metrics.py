"""A run's metrics.jsonl: one JSON row a line (a training step's loss and LR, an epoch's
evaluation), appended as the run goes by rank 0 and passed on to the loggers train.loggers names
(vitscale.train.loggers); read back by the study, the benchmarks and a resumed run.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitscale.common import rundir
from vitscale.common.io import atomic_write_text
from vitscale.train.loggers import open_loggers


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, passing over lines a kill cut or damage left unreadable."""
    path, rows = run_dir / rundir.METRICS, []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


class Metrics:
    """metrics.jsonl, and the loggers train.loggers names (vitscale.train.loggers), written by rank 0."""

    def __init__(self, run_dir: Path, main: bool, resume_step: int, loggers: tuple[str, ...] = ()):
        self.path, self.main = run_dir / rundir.METRICS, main
        self.rows: list[dict] = []
        if main and self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            self.rows = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.loggers = open_loggers(loggers, run_dir, self.rows) if main else []  # from the kept rows

    def log(self, row: dict) -> None:
        """Append `row` to metrics.jsonl and hand it to each logger (rank 0; the others keep none)."""
        if not self.main:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        """Close the loggers (metrics.jsonl is opened per row, so has nothing to close)."""
        for logger in self.loggers:
            logger.close()
