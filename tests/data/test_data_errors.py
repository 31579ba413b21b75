"""Hostile data (issue 10): bad label lists, unreadable files, no validation, one class, empty
classes. Each case ends in one `vitscale: error:` line naming the file or field (exit 2), or
trains and says in the log what it skipped."""

import functools
import io
import json
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import ranks
import yaml
from PIL import Image

from vitscale.cli import main
from vitscale.common.errors import UserError
from vitscale.data import DataConfig, build_datasets

FAST = ["--train.batch=4", "--train.max_steps=2", "--train.threads=1", "--data.image_size=16",
        "--model.patch_size=4", "--train.warmup_epochs=0"]


def images(root: Path, good: dict[str, int], broken: dict[str, int] | None = None) -> str:
    """A class-per-subfolder tree of tiny PNGs (`good`) and undecodable .jpg files (`broken`)."""
    for c, n in good.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((8, 8, 3), (40 * i + 60 * len(c)) % 256, np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    for c, n in (broken or {}).items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return str(root)


def train(tmp_path, capsys, *args) -> tuple[int, str, str]:
    """Run `vitscale train` -> (exit code, stdout, stderr)."""
    code = main(["train", "--out", str(tmp_path / "run"), *FAST, *args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *words: str) -> bool:
    """Exit 2 with one error line that contains every word."""
    return (code == 2 and err.startswith("vitscale: error:") and err.count("\n") == 1
            and all(w in err for w in words))


@functools.cache
def tiny_video() -> bytes:
    """A 2-frame 16 x 16 mp4."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for _ in range(2):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        c.mux(s.encode())
    return out.getvalue()


def csv(tmp_path, content: str | bytes) -> str:
    """list.csv in tmp_path, beside videos a.mp4, b.mp4, c.mp4 and 0.mp4 .. 9.mp4."""
    for name in ["a", "b", "c", *map(str, range(10))]:
        (tmp_path / f"{name}.mp4").write_bytes(tiny_video())
    path = tmp_path / "list.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# ----------------------------------------------------------------------------- item 8: labels
@pytest.mark.parametrize("label", ["999999", "9" * 30, "5"])
def test_a_label_beyond_the_classes_is_refused_naming_its_line(tmp_path, capsys, label):
    path = csv(tmp_path, f"a.mp4,0\nb.mp4,{label}\nc.mp4,1\n")
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "list.csv:2", "data.num_classes"), err


@pytest.mark.parametrize("label", ["-1", "1.0", "²", "cat"])
def test_a_label_that_is_not_a_class_id_is_refused_naming_its_line(tmp_path, capsys, label):
    path = csv(tmp_path, f"a.mp4,0\nb.mp4,{label}\n")
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "list.csv:2"), err


def test_a_declared_class_count_allows_ids_without_videos(tmp_path):
    path = csv(tmp_path, "a.mp4,0\nb.mp4,5\n")
    _, _, _, info = build_datasets(DataConfig(name="video-csv", path=path, val_path=path, num_classes=10))
    assert info.num_classes == 10
    with pytest.raises(ValueError, match="list.csv:2.*data.num_classes=3"):
        build_datasets(DataConfig(name="video-csv", path=path, val_path=path, num_classes=3))
    with pytest.raises(ValueError, match="data.num_classes"):
        DataConfig(name="image-folder", path=path, num_classes=3)
    with pytest.raises(ValueError, match="data.num_classes"):
        DataConfig(name="video-csv", path=path, num_classes=10**30)


def test_val_list_labels_count_too(tmp_path):
    train_list = csv(tmp_path, "a.mp4,0\nb.mp4,1\n")
    (tmp_path / "val.csv").write_text("c.mp4,2\n")
    with pytest.raises(ValueError, match="val.csv:1"):
        build_datasets(DataConfig(name="video-csv", path=train_list, val_path=str(tmp_path / "val.csv")))


# ----------------------------------------------------------------------------- item 15: list files
def test_a_binary_list_is_refused_naming_the_file(tmp_path, capsys):
    path = csv(tmp_path, b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfa" * 4)
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "list.csv", "not a text file"), err


@pytest.mark.parametrize("first", ["a.mp4", "a.mp4,", "a.mp4,cat", "clips/a 1.5"])
def test_a_first_line_without_a_label_is_no_header(tmp_path, capsys, first):
    path = csv(tmp_path, f"{first}\nb.mp4,0\nc.mp4,1\n")
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "list.csv:1"), err


@pytest.mark.parametrize("header", ["path,label", "video label", "# comment\nfilename, class_id"])
def test_a_header_line_is_skipped(tmp_path, header):
    path = csv(tmp_path, f"{header}\nb.mp4,0\nc.mp4,1\n")
    train_set, _, _, info = build_datasets(DataConfig(name="video-csv", path=path, val_path=path))
    assert len(train_set) == 2 and info.num_classes == 2


def test_a_list_path_that_is_a_folder_is_refused(tmp_path, capsys):
    code, _, err = train(tmp_path, capsys, f"--data.path={tmp_path}", "--data.name=video-csv")
    assert refused(code, err, str(tmp_path), "not a file"), err


# ----------------------------------------------------------------------------- item 11
def test_no_validation_trains_and_says_so(tmp_path, capsys):
    code, out, err = train(tmp_path, capsys, "--data.val_fraction=0")
    assert code == 0, err
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert "val_top1" not in final and final["step"] == 2
    assert "no validation" in err  # a warning: on stderr
    assert (tmp_path / "run" / "best").is_dir()  # the latest checkpoint stands in for the best
    code = main(["eval", str(tmp_path / "run")])
    assert refused(code, capsys.readouterr().err, "val_fraction"), err


def test_a_batch_of_unreadable_files_is_skipped(tmp_path, capsys):
    # 1 readable of 8 training files: with a batch of 2, at least 3 of 4 batches have nothing to learn from
    data = images(tmp_path / "train", {"cat": 1}, {"cat": 3, "dog": 4})
    val = images(tmp_path / "val", {"cat": 2, "dog": 2})
    code, out, err = train(tmp_path, capsys, f"--data.path={data}", "--data.name=image-folder",
                           f"--data.val_path={val}", "--train.batch=2", "--train.max_steps=4")
    assert code == 0, err
    assert "bad0.jpg" in out and "no update" in out
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(np.isfinite(r.get("loss", 0.0)) for r in rows)


def test_unreadable_validation_files_are_named_in_the_log(tmp_path, capsys):
    data = images(tmp_path / "train", {"cat": 4, "dog": 4})
    val = images(tmp_path / "val", {"cat": 2, "dog": 1}, {"dog": 1})
    code, out, err = train(tmp_path, capsys, f"--data.path={data}", "--data.name=image-folder",
                           f"--data.val_path={val}")
    assert code == 0, err
    assert any("bad0.jpg" in line and "evaluation" in line for line in out.splitlines()), out


def test_an_all_unreadable_validation_batch_is_skipped(tmp_path, capsys):
    data = images(tmp_path / "train", {"cat": 4, "dog": 4})
    val = images(tmp_path / "val", {"cat": 1}, {"cat": 4, "dog": 4})
    code, out, err = train(tmp_path, capsys, f"--data.path={data}", "--data.name=image-folder",
                           f"--data.val_path={val}")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "final.json").read_text())["val_top1"] in (0.0, 1.0)


@pytest.mark.parametrize("task", ["train", "linprobe"])
def test_one_class_is_refused(tmp_path, capsys, task):
    data = images(tmp_path / "train", {"cat": 6})
    extra = ["--init=random", "--linear-probe"] if task == "linprobe" else []
    code = main(["finetune" if extra else "train", "--out", str(tmp_path / "run"), *FAST, *extra,
                 f"--data.path={data}", "--data.name=image-folder"])
    assert refused(code, capsys.readouterr().err, "2 classes"), code


def test_one_class_may_pretrain(tmp_path, capsys):
    data = images(tmp_path / "train", {"cat": 10})
    code = main(["pretrain", "--out", str(tmp_path / "run"), *FAST, f"--data.path={data}",
                 "--data.name=image-folder"])
    assert code == 0, capsys.readouterr().err


def test_one_label_in_a_list_is_refused(tmp_path, capsys):
    path = csv(tmp_path, "".join(f"{i}.mp4,0\n" for i in range(10)))
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "2 classes"), err


def test_an_empty_class_folder_is_dropped_with_a_warning(tmp_path, capsys):
    data = images(tmp_path / "train", {"cat": 4, "dog": 4})
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("not an image")
    val = images(tmp_path / "val", {"cat": 1, "dog": 1})
    (tmp_path / "val" / "empty").mkdir()  # empty in val too: not "a class training lacks"
    code, out, err = train(tmp_path, capsys, f"--data.path={data}", "--data.name=image-folder",
                           f"--data.val_path={val}")
    assert code == 0, err
    assert any(line.startswith("warning:") and "empty" in line for line in err.splitlines()), err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_unreadable_batches_keep_two_ranks_in_step(tmp_path, capsys, sharding):
    """A rank whose batch (train or eval) has no readable file still takes part: no hang."""
    data = images(tmp_path / "train", {"cat": 1, "dog": 1}, {"cat": 7, "dog": 7})
    val = images(tmp_path / "val", {"cat": 1, "dog": 1}, {"cat": 3, "dog": 3})
    args = ["--out", str(tmp_path / "run"), *FAST, "--train.max_steps=4", f"--data.path={data}",
            "--data.name=image-folder", f"--data.val_path={val}", "--train.fsdp=" + str(sharding == "fsdp")]
    out = ranks.vitscale_here("train", *args, capsys=capsys)
    assert "no update" in out and "evaluation: " in out


def test_a_linear_probe_batch_with_one_readable_file_trains(tmp_path, capsys):
    data = images(tmp_path / "train", {"cat": 1}, {"dog": 3})  # one batch of 4 with one readable file
    val = images(tmp_path / "val", {"cat": 1, "dog": 1})
    code = main(["finetune", "--out", str(tmp_path / "run"), *FAST, "--init=random", "--linear-probe",
                 f"--data.path={data}", "--data.name=image-folder", f"--data.val_path={val}"])
    assert code == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- more hostile data
@pytest.mark.parametrize("field, value", [
    ("mean", (float("nan"), 0.0, 0.0)), ("std", (float("inf"), 1.0, 1.0)), ("num_clips", 10**9),
    ("train_size", 10**9), ("val_size", 10**9), ("canvas", 4096)])
def test_data_numbers_beyond_sense_are_refused(field, value):
    with pytest.raises(UserError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_a_billion_clips_is_refused_before_any_work(tmp_path, capsys):
    code, _, err = train(tmp_path, capsys, "--data.name=moving-digits", "--data.num_clips=1000000000")
    assert refused(code, err, "data.num_clips"), err


def test_a_list_of_missing_files_is_refused_and_a_few_are_warned_about(tmp_path, capsys):
    path = csv(tmp_path, "".join(f"videos/{i}.mp4,{i % 2}\n" for i in range(8)))
    code, _, err = train(tmp_path, capsys, f"--data.path={path}", "--data.name=video-csv")
    assert refused(code, err, "list.csv:1", "videos/0.mp4", "relative to"), err
    (tmp_path / "videos").mkdir()
    for i in range(6):
        (tmp_path / "videos" / f"{i}.mp4").write_bytes(tiny_video())
    with pytest.warns(UserWarning, match=r"2 of the 8 files listed in .*list.csv do not exist.*list.csv:7"):
        build_datasets(DataConfig(name="video-csv", path=path))


def test_quoted_list_fields_are_read(tmp_path):
    path = csv(tmp_path, '"path","label"\n"a.mp4",0\n"b.mp4","1"\n')
    train_set, _, _, info = build_datasets(DataConfig(name="video-csv", path=path, val_path=path))
    assert [Path(p).name for p, _ in train_set.samples] == ["a.mp4", "b.mp4"] and info.num_classes == 2


def test_a_very_large_image_loads_without_a_warning(tmp_path, monkeypatch):
    root = images(tmp_path / "train", {"cat": 1, "dog": 1})
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "train" / "cat" / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 is "large", not yet a bomb (2x)
    _, val, _, _ = build_datasets(DataConfig(name="image-folder", path=root, val_path=root, image_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(val[i] for i in range(len(val)))


def test_data_with_no_readable_file_is_refused_at_the_start(tmp_path, capsys):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"  # a Git LFS pointer
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(20):
            (tmp_path / "train" / c / f"{i}.jpg").write_bytes(pointer)
    code, out, err = train(tmp_path, capsys, f"--data.path={tmp_path / 'train'}", "--data.name=image-folder")
    assert refused(code, err, "could be read", ".jpg", "LFS"), err
    assert not (tmp_path / "run").exists()  # refused before any work
