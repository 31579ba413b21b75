"""A run's life when things go wrong (issue 10): re-running a finished run, moving or copying a
run, damaged checkpoints, a full disk, `eval` on a damaged run, a study's damaged records.
Each ends in one line that names the file and says what to do, and loses nothing; a resumed
run still ends bitwise equal to one never interrupted."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitscale import tasks
from vitscale.cli import main
from vitscale.common import checkpoint
from vitscale.study import results, runner
from vitscale.study.config import StudyConfig
from vitscale.study.results import Point, SeedResult, Sizing
from vitscale.train import config, engine

FAST = ["--train.batch=32", "--train.max_steps=4", "--train.ckpt_every=2", "--train.threads=1",
        "--data.image_size=16", "--model.patch_size=4", "--train.warmup_epochs=0"]


def vitscale(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.startswith("vitscale: ") and err.count("\n") == 1


def weights(ckpt: Path) -> dict:
    """A checkpoint's tensors, copied out of the files (which a test may then cut in place)."""
    return {k: v.clone() for k, v in load_file(str(ckpt / "model.safetensors")).items()} | {
        f"optim/{k}": v.clone() for k, v in load_file(str(ckpt / "optim.safetensors")).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("made") / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run, somewhere else (a run directory is where it is)."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1: finished runs
@pytest.mark.parametrize("damage", [None, "", "{", "[1, 2]", '{"val_top1": "x"}', b"\xff\xfe\x00"])
def test_a_finished_run_run_again_prints_its_result_and_keeps_final_json(run, capsys, damage):
    final = run / "final.json"
    kept = json.loads(final.read_text())
    if damage is not None:
        final.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    code, out, err = vitscale(capsys, "train", "--out", str(run), *FAST, "--json")
    assert code == 0, err
    metrics = {k: v for k, v in kept.items() if k not in ("step", "best")}
    assert json.loads(out) == metrics  # with --json, stdout holds the JSON alone; the log is on stderr
    assert json.loads(final.read_text()) == kept  # from the last evaluation, never without its metrics
    assert (damage is None) == ("cannot be read" not in err)


def test_a_kill_before_final_json_and_best_is_made_good_on_the_next_run(run, capsys):
    kept = json.loads((run / "final.json").read_text())
    (run / "final.json").unlink()
    shutil.rmtree(run / "best")  # the kill came before best/ was published too
    code, out, _ = vitscale(capsys, "train", "--out", str(run), *FAST)
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"done: val_top1 {kept['val_top1']:.4g}")
    assert json.loads((run / "final.json").read_text()) == kept
    assert (run / "best").is_dir() or kept["best"] != kept["val_top1"]


def test_a_final_json_that_is_a_directory_is_one_line(run, capsys):
    (run / "final.json").unlink()
    (run / "final.json").mkdir()
    code, _, err = vitscale(capsys, "train", "--out", str(run), *FAST)
    assert code == 2 and one_line(err) and "final.json is a directory" in err


# ----------------------------------------------------------------------------- 2: moved runs
def test_a_copied_run_resumes_where_it_is_and_leaves_the_original_alone(finished, run, capsys):
    assert "out" not in yaml.safe_load((run / "config.yaml").read_text())
    before = snapshot(finished)
    end = weights(run / "ckpt-00000004")
    shutil.rmtree(run / "ckpt-00000004")  # as a kill after step 2's checkpoint leaves it
    (run / "final.json").unlink()
    code, out, err = vitscale(capsys, "train", "--config", str(run / "config.yaml"))
    assert code == 0, err
    assert f"resumed from {run / 'ckpt-00000002'}" in out and f"results in {run}" in out
    assert same(weights(run / "ckpt-00000004"), end)  # bitwise the run never interrupted
    assert snapshot(finished) == before


def test_an_old_config_yaml_naming_another_out_resumes_in_its_own_directory(finished, run, capsys):
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(saved | {"out": str(finished)}))  # as before the fix
    before = snapshot(finished)
    shutil.rmtree(run / "ckpt-00000004")
    code, out, err = vitscale(capsys, "train", "--config", str(run / "config.yaml"))
    assert code == 0 and f"resumed from {run / 'ckpt-00000002'}" in out, err
    assert snapshot(finished) == before
    code, out, err = vitscale(capsys, "train", "--out", str(run), *FAST)  # --out of a run resumes it too
    assert code == 0 and "finished before" in out, err


def test_a_config_outside_a_run_still_starts_a_new_run(tmp_path, run, capsys):
    other = tmp_path / "configs" / "config.yaml"
    other.parent.mkdir()
    shutil.copy(run / "config.yaml", other)
    assert config.home(other) is None and config.home(run / "config.yaml") == str(run)
    code, _, err = vitscale(capsys, "train", "--config", str(other), "--out", str(tmp_path / "new"))
    assert code == 0 and (tmp_path / "new" / "final.json").is_file(), err


def test_a_moved_cooldown_branch_resumes(tmp_path, capsys):
    """A study's cooldown names its parent's checkpoint (train.branch_from): moved with it, it
    resumes (a run's place and starting point are no part of its config's identity)."""
    wsd = [*FAST, "--train.schedule=wsd"]
    old = tmp_path / "old"
    code, _, err = vitscale(capsys, "train", "--out", str(old / "stable"), *wsd, "--train.decay_frac=0",
                            "--train.keep_steps=3")
    assert code == 0, err
    cool = [*wsd, "--train.decay_frac=0.25", "--train.max_steps=4"]
    code, _, err = vitscale(capsys, "train", "--out", str(old / "cool"), *cool,
                            f"--train.branch_from={checkpoint.at(old / 'stable', 3)}")
    assert code == 0, err
    new = tmp_path / "new"
    shutil.move(old, new)
    code, out, err = vitscale(capsys, "train", "--out", str(new / "cool"), *cool,
                              f"--train.branch_from={checkpoint.at(new / 'stable', 3)}")
    assert code == 0 and "finished before" in out, err


def test_a_moved_study_continues_where_it_is(tmp_path, monkeypatch, capsys):
    cfg = StudyConfig(out=str(tmp_path / "made"))
    runner._prepare(cfg)
    assert "out" not in yaml.safe_load((tmp_path / "made" / "study.yaml").read_text())
    (tmp_path / "made" / "trials" / "base").mkdir(parents=True)
    shutil.move(tmp_path / "made", tmp_path / "moved")
    seen = []
    monkeypatch.setattr(runner, "run_study", lambda s, only=None: seen.append(s.out))
    assert vitscale(capsys, "study", "--config", str(tmp_path / "moved" / "study.yaml"))[0] == 0
    assert seen == [str(tmp_path / "moved")]


# ----------------------------------------------------------------------------- 5: damaged checkpoints
def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _state(ckpt: Path, **change) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(state | change))


def _reshaped(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    save_file(tensors | {key: torch.zeros(3, 3)}, str(ckpt / "model.safetensors"))


def _poisoned(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    key = next(iter(tensors))
    save_file(tensors | {key: torch.full_like(tensors[key], float("inf"))}, str(ckpt / "model.safetensors"))


DAMAGE = {
    "model.safetensors is missing": lambda c: (c / "model.safetensors").unlink(),
    "optim.safetensors is missing": lambda c: (c / "optim.safetensors").unlink(),
    "rng.safetensors is missing": lambda c: (c / "rng.safetensors").unlink(),
    "state.json is missing": lambda c: (c / "state.json").unlink(),
    "model.safetensors cannot be read": lambda c: _cut(c / "model.safetensors"),
    "optim.safetensors cannot be read": lambda c: _cut(c / "optim.safetensors"),
    "state.json cannot be read": lambda c: _cut(c / "state.json"),
    "state.json is incomplete": lambda c: (c / "state.json").write_text("{}"),
    "is not this checkpoint's": lambda c: _state(c, step=99),
    "without params": lambda c: _state(c, optim={"param_groups": [1], "scalars": {}}),
    "does not fit this run's model": _reshaped,
    "non-finite weights": _poisoned,
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_for_the_newest_good_one(run, capsys, what):
    end = weights(run / "ckpt-00000004")
    DAMAGE[what](run / "ckpt-00000004")
    code, out, err = vitscale(capsys, "train", "--out", str(run), *FAST)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))  # warnings: stderr
    assert what in warning and "ckpt-00000004" in warning and f"using {run / 'ckpt-00000002'}" in warning
    assert f"resumed from {run / 'ckpt-00000002'}" in out
    assert same(weights(run / "ckpt-00000004"), end)  # trained again, bitwise as before


def test_no_usable_checkpoint_is_one_line_and_nothing_is_lost(run, capsys):
    for step in (2, 4):
        _cut(run / f"ckpt-{step:08d}" / "model.safetensors")
    before = snapshot(run)
    code, _, err = vitscale(capsys, "train", "--out", str(run), *FAST)
    assert code == 2 and one_line(err) and "no usable checkpoint" in err and "ckpt-00000004" in err, err
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}


def test_a_checkpoint_with_non_finite_weights_is_never_the_last_good_one(tmp_path, monkeypatch, capsys):
    real_save, real_forward, calls = checkpoint.save, tasks.Classifier.forward, {"n": 0}

    def save(run_dir, step, model_state, *a, **k):  # step 4's weights are already infinite
        if step == 4:
            model_state = {n: torch.full_like(v, float("inf")) for n, v in model_state.items()}
        return real_save(run_dir, step, model_state, *a, **k)

    def forward(self, x, y):
        calls["n"] += 1
        loss = real_forward(self, x, y)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(tasks.Classifier, "forward", forward)
    code, _, err = vitscale(capsys, "train", "--out", str(tmp_path / "run"), *FAST, "--train.max_steps=6")
    assert code == 3 and one_line(err), err
    assert f"last good checkpoint is {tmp_path / 'run' / 'ckpt-00000002'}" in err


# ----------------------------------------------------------------------------- 6: a full disk
def _full_disk(monkeypatch, error):
    real = checkpoint.save_file

    def save_file(tensors, path):
        if "ckpt-00000004" in path:
            raise error
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes(finished, tmp_path, monkeypatch,
                                                                        capsys, error):
    out = tmp_path / "run"
    _full_disk(monkeypatch, error)
    code, _, err = vitscale(capsys, "train", "--out", str(out), *FAST)
    assert code == 3 and one_line(err), err
    assert f"no space left in {out}" in err and f"last good checkpoint is {out / 'ckpt-00000002'}" in err
    assert "run the same command again" in err
    assert [p.name for p in checkpoint.checkpoints(out)] == ["ckpt-00000002"]
    assert not list(out.glob("*.tmp"))  # what was written of step 4 is freed
    monkeypatch.undo()
    code, text, err = vitscale(capsys, "train", "--out", str(out), *FAST)
    assert code == 0 and "resumed from" in text, err
    assert same(weights(out / "ckpt-00000004"), weights(finished / "ckpt-00000004"))


def test_a_full_disk_at_final_json_is_made_good_on_the_next_run(tmp_path, monkeypatch, capsys):
    real = engine.atomic_write_text

    def write(path, text):
        if path.name == "final.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(engine, "atomic_write_text", write)
    out = tmp_path / "run"
    code, _, err = vitscale(capsys, "train", "--out", str(out), *FAST)
    assert code == 3 and one_line(err) and "final.json" in err and "ckpt-00000004" in err, err
    monkeypatch.undo()
    code, text, err = vitscale(capsys, "train", "--out", str(out), *FAST)
    assert code == 0 and "val_top1" in json.loads((out / "final.json").read_text()), err


# ----------------------------------------------------------------------------- 13: eval
def test_init_from_a_run_passes_over_a_damaged_best(run, tmp_path, capsys):
    _cut(run / "best" / "model.safetensors")
    code, _, err = vitscale(capsys, "finetune", "--init", str(run), "--out", str(tmp_path / "ft"), *FAST,
                            "--train.max_steps=1")
    assert code == 0, err
    assert "warning:" in err and str(run / "best" / "model.safetensors") in err and "ckpt-00000004" in err


def test_eval_passes_over_a_damaged_best(run, capsys):
    _cut(run / "best" / "model.safetensors")
    code, out, err = vitscale(capsys, "eval", str(run), "--json")
    assert code == 0, err
    assert "warning:" in err and str(run / "best" / "model.safetensors") in err and "ckpt-00000004" in err
    final = json.loads((run / "final.json").read_text())
    assert json.loads(out)["val_top1"] == pytest.approx(final["val_top1"])


@pytest.mark.parametrize("command,section,key,value,message", [
    ("eval", "model", "width", 96, "does not fit this run's model"),
    ("train", "model", "width", 96, "does not fit this run's model"),
    ("eval", "task", None, "mae", "does not fit this run's model"),
    ("eval", "data", "image_size", 24, "are not its data's"),
])
def test_a_changed_config_yaml_is_one_line(run, capsys, command, section, key, value, message):
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if key:
        saved[section][key] = value
    else:
        saved[section] = value
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    argv = ["eval", str(run)] if command == "eval" else ["train", "--config", str(run / "config.yaml")]
    code, _, err = vitscale(capsys, *argv)
    assert code == 2 and one_line(err) and message in err and "config.yaml" in err, err


# ----------------------------------------------------------------------------- 14: a study's records
POINT = Point(1.0, 10, 320, 1e9, 1.0, 0.5, 1.0, 0.01, True)
SEED = SeedResult("base", 0, (POINT,), (POINT,), 1.0, 100.0)
SIZING = Sizing(1e6, 10, 5, 100, {"samples_per_s": 100.0, "peak_mem_mb": 1.0}, 1)


def _as(record, **change) -> str:
    return json.dumps(results.to_dict(record) | change)


@pytest.mark.parametrize("record,text", [
    (SEED, ""), (SEED, _as(SEED)[:40]), (SEED, "null"), (SEED, "[]"), (SEED, _as(SEED, points=[])),
    (SEED, _as(SEED, seed="0")), (SEED, _as(SEED, trial="w-x2")), (SEED, _as(SEED, seed=5)),
    (SIZING, _as(SIZING, measured={})), (SIZING, _as(SIZING, steps=0)), (SIZING, b"\xff\xfe"),
])
def test_a_damaged_study_record_is_run_again_with_a_warning(tmp_path, record, text, logged):
    path, said = tmp_path / "result.json", logged
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    expect = {"trial": "base", "seed": 0} if record is SEED else {}
    assert results.finished(path, type(record), "running it again", **expect) is None
    assert len(said) == 1 and said[0].startswith(f"warning: {path}") and said[0].endswith("running it again")
    results.write(path, record)
    assert results.finished(path, type(record), "running it again", **expect) == record
    assert len(said) == 1


def test_damaged_metrics_lines_are_passed_over(tmp_path):
    rows = [{"step": 1, "split": "val", "val_top1": 0.5}, {"step": 2, "split": "val", "val_top1": 0.6}]
    (tmp_path / "metrics.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n[3]\n\xff\n{\"st"
                                            + b"\n" + json.dumps(rows[1]).encode() + b"\n")
    assert runner.engine_rows(tmp_path) == rows
