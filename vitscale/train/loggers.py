"""Where a run's metric rows go besides metrics.jsonl: CSV, TensorBoard, Weights & Biases, MLflow.

By default every backend writes into the run directory and nowhere else (W&B offline, MLflow's
file store), so a run's record travels with it. W&B and MLflow go online where the user's
environment says so, through the variables those tools already read: WANDB_MODE, WANDB_PROJECT,
WANDB_ENTITY; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME. Each backend is rebuilt from the rows a
run keeps when it starts or resumes (the rows up to its checkpoint, as metrics.jsonl is), so a kill
and a resume leave every backend holding each row once. Their packages are optional extras,
imported only here.

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

from vitscale.common.errors import UserError
from vitscale.common.io import atomic_write_text

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
    """A W&B run named after RUN, its local files in RUN/wandb. WANDB_MODE, WANDB_PROJECT and
    WANDB_ENTITY choose where it goes (online, say); unset, it is offline in project "vitscale"
    (`wandb sync RUN/wandb/offline-run-*` uploads it). A resume starts a new W&B run holding the
    kept rows (online, the killed run's W&B run stays, with the rows it got)."""

    def __init__(self, run_dir: Path):
        import wandb

        shutil.rmtree(run_dir / "wandb", ignore_errors=True)  # rebuilt from the kept rows
        env = os.environ
        self.run = wandb.init(mode=env.get("WANDB_MODE") or "offline", project=env.get("WANDB_PROJECT")
                              or "vitscale", entity=env.get("WANDB_ENTITY") or None, dir=str(run_dir),
                              name=run_dir.name, settings=wandb.Settings(silent=True, console="off"))

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
    """An MLflow run named after RUN, in experiment MLFLOW_EXPERIMENT_NAME ("vitscale" if unset), at
    MLFLOW_TRACKING_URI (a server, or file:DIR); unset, in a file store at RUN/mlruns, which
    `mlflow ui --backend-store-uri RUN/mlruns` shows. RUN/mlflow-run-id names the MLflow run: on a
    resume that run is marked deleted (MLflow hides it; its files stay) and a new one holds the kept
    rows. Other runs in the store are left alone."""

    ID = "mlflow-run-id"

    def __init__(self, run_dir: Path):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            (run_dir / "mlruns").mkdir(exist_ok=True)
            uri = (run_dir / "mlruns").resolve().as_uri()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vitscale"
        with _file_store():
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            if (run_dir / self.ID).is_file():  # a killed (or earlier) start's
                with contextlib.suppress(MlflowException):  # (gone, or in another store)
                    self.client.delete_run((run_dir / self.ID).read_text().strip())
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        atomic_write_text(run_dir / self.ID, self.run_id + "\n")

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, int(row["step"])) for k, v in scalars(row).items()]
        with _file_store():
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        with _file_store():
            self.client.set_terminated(self.run_id)
