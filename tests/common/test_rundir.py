"""Where runs, studies and soups may write (fuzz items 1, 3 and 6 of the own-data issue): a run
directory is new, empty or holds that work; never the filesystem root, a home directory, a
folder of other things or the data it trains on; a data scan passes over folders holding runs;
a soup never replaces one already made."""

import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vitscale.cli import main
from vitscale.common import lock, rundir
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides, dump_yaml
from vitscale.data.folders import IMAGE_EXTS, scan_folder
from vitscale.runs import soup
from vitscale.train.config import RunConfig

FAST = ["--train.batch=8", "--train.max_steps=1", "--train.threads=1", "--data.image_size=16",
        "--model.patch_size=4", "--model.depth=1", "--train.warmup_epochs=0"]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cluttered(folder: Path) -> Path:
    """A folder of someone's things (no run): a file and a subfolder with a file."""
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "src" / "main.py").write_text("print(1)")
    return folder


@pytest.fixture
def no_lock(monkeypatch):
    """Taking the run directory's lock is the first write: a refusal must come before it."""
    def held(*args, **kwargs):
        raise AssertionError(f"lock.held{args[:1]} reached: the refusal came after a write")
    monkeypatch.setattr(lock, "held", held)


def refused(capsys, args: list[str], *words: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitscale: error: "), err
    for word in words:
        assert word in err, err
    return err


# ----------------------------------------------------------------------------- item 1: run directories
@pytest.mark.parametrize("command", [["train"], ["pretrain"], ["distill", "--teacher", "nowhere"]])
def test_a_folder_of_other_things_is_no_run_directory(tmp_path, capsys, no_lock, command):
    folder = cluttered(tmp_path / "mine")
    before = listing(folder)
    refused(capsys, [*command, "--out", str(folder), *FAST], "holds other files and no run", "new or empty")
    assert listing(folder) == before


def test_the_filesystem_root_is_refused_before_anything_is_written(capsys, no_lock):
    before = sorted(os.listdir("/"))
    refused(capsys, ["train", "--out", "/", *FAST], "filesystem root")
    assert sorted(os.listdir("/")) == before


def test_a_home_directory_is_refused_even_empty(tmp_path, capsys, monkeypatch, no_lock):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["train", "--out", str(home), *FAST], "home directory")
    refused(capsys, ["train", "--out", str(home / "sub" / ".."), *FAST], "home directory")
    refused(capsys, ["train", "--out=~", *FAST], "home directory")  # as `--out=~` reaches it
    assert listing(home) == [] and listing(tmp_path) == ["home"]


@pytest.mark.parametrize("what", ["run", "study", "soup"])
def test_a_new_or_empty_folder_is_taken(tmp_path, what):
    (tmp_path / "empty").mkdir()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / lock.NAME).write_text("{}")  # a run killed before its config: as empty
    for out in ("new", "new/deeper", "empty", "killed"):
        assert rundir.check_out(tmp_path / out, what) == tmp_path / out


def test_a_folder_holding_the_work_is_taken_and_a_file_refused(tmp_path):
    run = cluttered(tmp_path / "run")
    (run / "config.yaml").write_text(dump_yaml(RunConfig()))
    assert rundir.check_out(run) == run
    with pytest.raises(UserError, match="no study"):
        rundir.check_out(run, "study", rundir.STUDY)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        rundir.check_out(tmp_path / "f")


def test_a_run_trains_into_an_empty_folder_and_resumes_there(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--out", str(out), *FAST, "--data.train_size=64"]
    assert main(args) == 0
    assert (out / "config.yaml").is_file() and (out / "final.json").is_file()
    capsys.readouterr()
    assert main(args) == 0 and "finished before" in capsys.readouterr().out


def test_a_study_needs_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    def reached(*a, **k):
        raise AssertionError("the study started")
    monkeypatch.setattr(lock, "held", reached)
    folder = cluttered(tmp_path / "mine")
    refused(capsys, ["study", "--out", str(folder)], "no study (no study.yaml)")
    refused(capsys, ["study", "--out", "/"], "filesystem root")
    assert listing(folder) == ["notes.txt", "src", "src/main.py"]


def test_a_study_directory_is_taken(tmp_path):
    out = tmp_path / "study"
    (out / "trials" / "base").mkdir(parents=True)
    (out / "study.yaml").write_text("")
    assert rundir.check_out(out, "study", rundir.STUDY) == out


# ----------------------------------------------------------------------------- item 3: runs and data
def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (40 * c, 10 * i, 90)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("field", ["path", "val_path", "test_path"])
def test_out_inside_the_data_is_refused(tmp_path, capsys, no_lock, field):
    data = image_folder(tmp_path / "data")
    before = listing(data)
    paths = {"path": tmp_path / "data"} | {field: data}
    if field != "path":
        paths["path"] = image_folder(tmp_path / "train")
    flags = [f"--data.{k}={v}" for k, v in paths.items()]
    for out in (data / "runs" / "r1", data):
        refused(capsys, ["train", "--out", str(out), "--data.name=image-folder", *flags, *FAST],
                f"inside data.{field}", "outside the data")
    assert listing(data) == before


def test_a_data_scan_passes_over_folders_holding_runs(tmp_path):
    data = image_folder(tmp_path / "data")
    run = data / "run1"  # a run directory someone put in the data before this was refused
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(RunConfig()))
    Image.new("RGB", (20, 20)).save(run / "curves.png")
    nested = data / "cat" / "old-study"  # and a study inside a class folder
    nested.mkdir()
    (nested / "study.yaml").write_text("")
    Image.new("RGB", (20, 20)).save(nested / "plot.png")
    with pytest.warns(UserWarning) as said:
        samples, classes = scan_folder(str(data), IMAGE_EXTS)
    assert classes == ("cat", "dog") and len(samples) == 8
    assert all("run1" not in f and "old-study" not in f for f, _ in samples)
    text = " ".join(str(w.message) for w in said)
    assert str(run) in text and str(nested) in text and "hold a run or a study" in text


# ----------------------------------------------------------------------------- item 6: a soup is made once
def fake_run(folder: Path) -> str:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(apply_overrides(RunConfig(task="supervised"), [])))
    return str(folder)


def test_a_soup_already_made_is_not_replaced(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    out = tmp_path / "s"
    out.mkdir()
    (out / "config.yaml").write_text((tmp_path / "a" / "config.yaml").read_text())
    (out / "soup.json").write_text("{}")
    before = {p: p.read_text() for p in out.iterdir()}
    refused(capsys, ["soup", a, b, "--out", str(out)], "already holds a soup", "new or empty folder",
            "delete that soup")
    assert {p: p.read_text() for p in out.iterdir()} == before


@pytest.mark.parametrize("kind", ["run", "files", "root"])
def test_a_soup_goes_into_a_folder_of_its_own(tmp_path, capsys, kind):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    out = {"run": Path(fake_run(tmp_path / "other")), "files": cluttered(tmp_path / "mine"),
           "root": Path("/")}
    refused(capsys, ["soup", a, b, "--out", str(out[kind])],
            {"run": "already holds a run", "files": "already holds files", "root": "filesystem root"}[kind])


def test_an_empty_folder_takes_a_soup(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    (tmp_path / "s").mkdir()
    configs = soup._configs([a, b], str(tmp_path / "s"))
    assert [c[0] for c in configs] == [a, b] and yaml.safe_load(Path(a, "config.yaml").read_text())


def test_a_study_workers_log_alone_does_not_make_a_folder_foreign(tmp_path):
    """A study's worker opens log.txt in a sweep run's directory before the run writes config.yaml
    (make demo failed on runs/study/sweep/lr-0.004)."""
    from vitscale.common import rundir

    run = tmp_path / "sweep" / "lr-0.004"
    run.mkdir(parents=True)
    (run / "log.txt").write_text("study: starting\n")
    assert rundir.check_out(run) == run


@pytest.mark.parametrize("marker", ["config.yaml", "study.yaml"])
def test_a_run_killed_while_writing_its_config_starts_again_there(tmp_path, marker):
    """A SIGKILL between the temporary and the rename of the config leaves MARKER.tmp (with the
    lock, the write probe, a worker's log): that folder is the same run's, not a user's."""
    from vitscale.common import rundir

    run = tmp_path / "trials" / "d-x2" / "seed0" / "stable"
    run.mkdir(parents=True)
    for name in (".lock", ".write-test", "log.txt", f"{marker}.tmp"):
        (run / name).write_text("")
    assert rundir.check_out(run, marker=marker) == run
    (run / "notes.tmp").write_text("")  # any other temporary is someone else's
    with pytest.raises(UserError, match="other files"):
        rundir.check_out(run, marker=marker)
