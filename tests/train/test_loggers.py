"""train.loggers: each backend written for real and read back with its own reader; a resumed run
holds each row once; a missing package is one line before any work."""

import csv
import json
import struct
import time
from pathlib import Path

import pytest

from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides
from vitscale.train import engine, loggers
from vitscale.train.config import RunConfig
from vitscale.train.metrics import read_metrics

FAST = ["train.batch=32", "train.max_steps=4", "train.threads=1", "train.knn_k=0",
        "data.image_size=16", "model.patch_size=4", "train.warmup_epochs=0"]


def rows(first: int, last: int) -> list[dict]:
    """A train row a step and a val row every third step, as the engine logs them."""
    out = []
    for s in range(first, last + 1):
        out.append({"step": s, "epoch": s / 3, "split": "train", "loss": 1.0 / s, "lr": 0.1 * s})
        if s % 3 == 0:
            out.append({"step": s, "epoch": s / 3, "split": "val", "val_top1": s / 100, "train_s": 2.5})
    return out


def killed_and_resumed(run_dir: Path, names: tuple[str, ...]) -> list[dict]:
    """Steps 1-7 logged, a kill after the checkpoint at step 4, steps 5-9 logged again on resume:
    the rows each backend must end with (steps 1-9, each once)."""
    first = engine.Metrics(run_dir, True, 0, names)
    for row in rows(1, 7):
        first.log(row)
    first.close()  # (a kill leaves no close; the next run rebuilds from metrics.jsonl either way)
    again = engine.Metrics(run_dir, True, 4, names)
    for row in rows(5, 9):
        again.log(row)
    again.close()
    assert read_metrics(run_dir) == rows(1, 9)
    return rows(1, 9)


def expected_scalars(kept: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for row in kept:
        split = row["split"]
        for k, v in row.items():
            if k not in ("step", "epoch", "split"):
                out.setdefault(f"{split}/{k}", []).append((row["step"], v))
    return out


def test_csv_holds_every_row_once_under_the_union_of_their_keys(tmp_path):
    kept = killed_and_resumed(tmp_path, ("csv",))
    with open(tmp_path / "metrics.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["step", "epoch", "split", "loss", "lr", "val_top1", "train_s"]
    assert len(read) == len(kept)
    for got, want in zip(read, kept, strict=True):
        assert {k: v for k, v in got.items() if v != ""} == {k: str(v) for k, v in want.items()}


def test_tensorboard_events_hold_every_scalar_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want = expected_scalars(killed_and_resumed(tmp_path, ("tensorboard",)))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (run-ID.wandb): a 7-byte header (":W&B", magic,
    version), then LevelDB-log records (crc32, length, kind; 32 KiB blocks) each holding a
    protobuf Record, decoded with wandb's own message type."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file, {key: value} (a/b for a nested key)."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for record in wandb_records(path) if record.WhichOneof("record_type") == "history"]


TRACKING = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _no_tracking_variables(monkeypatch):
    """The defaults are tested without the variables a developer's shell may set."""
    for name in TRACKING:
        monkeypatch.delenv(name, raising=False)


def log_rows(run_dir: Path, names: tuple[str, ...]) -> None:
    run_dir.mkdir(exist_ok=True)
    metrics = engine.Metrics(run_dir, True, 0, names)
    for row in rows(1, 3):
        metrics.log(row)
    metrics.close()


@pytest.mark.slow  # (two wandb.init: 2-5 s)
def test_wandb_offline_run_holds_every_scalar_once(tmp_path):
    pytest.importorskip("wandb")
    want = expected_scalars(killed_and_resumed(tmp_path, ("wandb",)))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # the killed run's offline run was replaced by one rebuilt from the kept rows
    for _ in range(100):  # wandb-core may still be writing a process's second run after finish()
        history = wandb_history(runs[0])
        if len(history) >= 9:
            break
        time.sleep(0.1)
    got: dict[str, list] = {}
    for record in history:
        for k, v in record.items():
            if not k.startswith("_"):
                got.setdefault(k, []).append((record["_step"], v))
    assert got == want


@pytest.mark.slow  # (importing mlflow and two runs: 1-3 s)
def test_mlflow_file_store_holds_every_scalar_once(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    want = expected_scalars(killed_and_resumed(tmp_path, ("mlflow",)))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("vitscale").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert sorted(run.data.metrics) == sorted(want)
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == [(s, pytest.approx(v)) for s, v in points]


@pytest.mark.slow  # (a wandb.init: 1-3 s)
def test_wandb_takes_its_mode_project_and_entity_from_its_environment_variables(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    log_rows(tmp_path / "run", ("wandb",))
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.time() + 60  # wandb's own service process writes the file: under load, after finish()
    while not (runs := [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]):
        assert time.time() < deadline, [r.WhichOneof("record_type") for r in wandb_records(path)]
        time.sleep(0.2)
    (run,) = runs
    assert (run.project, run.entity, run.display_name) == ("my-project", "my-team", "run")


@pytest.mark.slow  # (importing wandb: 1-3 s)
def test_wandb_mode_disabled_from_the_environment_writes_no_wandb_run(tmp_path, monkeypatch):
    """The mode is the user's (it was forced offline); `disabled` is the one mode testable here."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log_rows(tmp_path / "run", ("wandb",))
    assert not list((tmp_path / "run").glob("wandb/offline-run-*"))
    assert len(read_metrics(tmp_path / "run")) == len(rows(1, 3))


@pytest.mark.slow  # (importing mlflow and four runs: 2-5 s)
def test_mlflow_logs_to_the_tracking_uri_of_its_environment_variable(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    log_rows(tmp_path / "a", ("mlflow",))
    (tmp_path / "b").mkdir()
    want = expected_scalars(killed_and_resumed(tmp_path / "b", ("mlflow",)))
    assert not (tmp_path / "a" / "mlruns").exists() and not (tmp_path / "b" / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"file:{store}")
    runs = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    # b's killed start was replaced by its resumed one; a's run, another run in the store, is kept
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    (b,) = [r for r in runs if r.info.run_name == "b"]
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(b.info.run_id, key))
        assert got == [(s, pytest.approx(v)) for s, v in points]


@pytest.mark.slow  # (a 4-step run: 2-6 s)
def test_a_training_run_sends_its_metrics_jsonl_rows_to_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = apply_overrides(RunConfig(out=str(tmp_path / "run")), [*FAST, "train.loggers=csv,tensorboard"])
    result = engine.train(cfg).metrics
    written = read_metrics(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [r["step"] for r in written]
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert events.Scalars("val/val_top1")[-1].value == pytest.approx(result["val_top1"])


def test_no_logger_is_used_unless_asked(tmp_path):
    """Only metrics.jsonl by default, even with tensorboard installed (it was used when importable)."""
    assert RunConfig().train.loggers == ()
    metrics = engine.Metrics(tmp_path, True, 0, RunConfig().train.loggers)
    for row in rows(1, 3):
        metrics.log(row)
    metrics.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize("name, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                         ("mlflow", "mlflow")])
def test_a_missing_package_is_one_line_naming_its_extra_before_any_work(tmp_path, monkeypatch, name, extra):
    monkeypatch.setattr(loggers, "installed", lambda module: False)
    cfg = apply_overrides(RunConfig(out=str(tmp_path / "run")), [*FAST, f"train.loggers=csv,{name}"])
    with pytest.raises(UserError, match=rf"pip install 'vitscale\[{extra}\]'") as e:
        engine.train(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_an_unknown_logger_is_refused_by_the_config():
    with pytest.raises(UserError, match="train.loggers must be among"):
        apply_overrides(RunConfig(), ["train.loggers=csv,neptune"])
