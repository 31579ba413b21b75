"""Where a run's metric rows go besides metrics.jsonl: CSV, TensorBoard, Weights & Biases, MLflow.

Every backend writes into the run directory and nowhere else (W&B offline, MLflow's file store),
so a run's record travels with it. Each is rebuilt from the rows a run keeps when it starts or
resumes (the rows up to its checkpoint, as metrics.jsonl is), so a kill and a resume leave every
backend holding each row once. Their packages are optional extras, imported only here.

    metrics row {"step": 40, "split": "val", "top1": 0.81, ...} -> each logger's log(row)
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

from vitscale.checkpoint import atomic_write_text
from vitscale.errors import UserError

# name in train.loggers -> (module that must be importable, extra that installs it); jsonl is always on
BACKENDS = {"jsonl": ("", ""), "csv": ("", ""), "tensorboard": ("tensorboard", "tensorboard"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


class Logger(Protocol):
    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


def check(names: tuple[str, ...]) -> None:
    """Raise a UserError for a logger vitscale does not know or whose package is not installed."""
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"train.loggers: unknown logger {name!r}; choose from {', '.join(BACKENDS)}")
        module, extra = BACKENDS[name]
        if module and not installed(module):
            raise UserError(f"train.loggers={name} needs the {module} package: pip install "
                            f"'vitscale[{extra}]' (or drop {name} from train.loggers)")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def open_loggers(names: tuple[str, ...], run_dir: Path, rows: list[dict]) -> list[Logger]:
    """The loggers `names` names (jsonl left out: Metrics writes it), each started afresh in
    `run_dir` and given `rows`, the rows the run keeps from before (none for a new run)."""
    check(names)
    made = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLflowLogger}
    loggers = [made[n](run_dir) for n in dict.fromkeys(names) if n != "jsonl"]
    for logger in loggers:
        for row in rows:
            logger.log(row)
    return loggers


def scalars(row: dict) -> dict[str, float]:
    """A row's numbers as "split/name" (train/loss, val/top1), what the plotting backends take."""
    split = row.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}


class CSVLogger:
    """metrics.csv: one line a row, columns the union of the rows' keys in the order first seen;
    a row with a new key rewrites the file (atomically) under the wider header, others append."""

    def __init__(self, run_dir: Path):
        self.path, self.rows, self.header = run_dir / "metrics.csv", [], []
        self._rewrite()

    def _lines(self, rows: list[dict]) -> str:
        out = io.StringIO()
        csv.DictWriter(out, self.header, lineterminator="\n").writerows(rows)
        return out.getvalue()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, (",".join(self.header) + "\n" if self.header else "")
                          + self._lines(self.rows))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.header]
        if new:
            self.header += new
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(self._lines([row]))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in RUN/tb, scalars tagged split/name at the row's optimizer step."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(run_dir / "tb", ignore_errors=True)  # rebuilt from the kept rows
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict) -> None:
        for tag, v in scalars(row).items():
            self.writer.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """An offline W&B run in RUN/wandb (`wandb sync RUN/wandb/offline-run-*` uploads it)."""

    def __init__(self, run_dir: Path):
        import wandb

        shutil.rmtree(run_dir / "wandb", ignore_errors=True)  # rebuilt from the kept rows
        self.run = wandb.init(mode="offline", dir=str(run_dir), project="vitscale", name=run_dir.name,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


@contextlib.contextmanager
def _file_store():
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set: set it (unless the
    user has) only while vitscale talks to the store."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MLflowLogger:
    """An MLflow run in a file store at RUN/mlruns (experiment "vitscale", run named after RUN):
    `mlflow ui --backend-store-uri RUN/mlruns` shows it. On a resume the earlier run is marked
    deleted (MLflow hides it; its files stay) and a new one holds the kept rows."""

    def __init__(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        store = run_dir / "mlruns"
        store.mkdir(exist_ok=True)
        with _file_store():
            self.client = MlflowClient(tracking_uri=store.resolve().as_uri())
            found = self.client.get_experiment_by_name("vitscale")
            experiment = found.experiment_id if found else self.client.create_experiment("vitscale")
            for run in self.client.search_runs([experiment]):  # a killed (or earlier) run's
                self.client.delete_run(run.info.run_id)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, int(row["step"])) for k, v in scalars(row).items()]
        with _file_store():
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        with _file_store():
            self.client.set_terminated(self.run_id)
