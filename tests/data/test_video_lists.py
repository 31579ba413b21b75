"""Video lists in VideoMAE V2's forms (issue 13): `path label`, `path start count` (pre-training,
`path 0 -1` = the whole video) and `path start count label`. A line's frame range bounds every
clip taken from it; malformed lines end in one error naming the file and line."""

from pathlib import Path

import pytest
import torch
from test_data import RAW, frame_ids, write_video
from test_data_errors import FAST, refused

from vitscale.cli import main
from vitscale.data import DataConfig, build_datasets
from vitscale.data.common import UnreadableFileError
from vitscale.data.video import read_clip

CLIP = dict(frames=4, frame_stride=2, image_size=16, **RAW)  # a clip spans (4 - 1) * 2 + 1 = 7 frames


def listing(tmp_path, text: str, videos: dict[str, int]) -> str:
    """list.txt in tmp_path beside videos {name: frame count} (frame k encodes k)."""
    for name, n in videos.items():
        write_video(tmp_path / name, n)
    (tmp_path / "list.txt").write_text(text)
    return str(tmp_path / "list.txt")


def test_a_frame_range_bounds_every_clip(tmp_path):
    path = listing(tmp_path, "path start count label\nv.mp4 20 10 0\nv.mp4 0 -1 1\nv.mp4,50,30,1\n",
                   {"v.mp4": 60})
    train, val, _, info = build_datasets(DataConfig(name="video-csv", path=path, val_path=path, **CLIP))
    assert info.num_classes == 2 and [val[i]["y"] for i in range(3)] == [0, 1, 1]
    # eval centers the 7-frame span in the range: 10 frames from 20 leave 3 to spare, 1 before
    assert frame_ids(val[0]["x"]) == [21, 23, 25, 27]
    assert frame_ids(val[1]["x"]) == frame_ids(read_clip(str(tmp_path / "v.mp4"), 4, 2, None))  # 0 -1: all
    assert frame_ids(val[2]["x"]) == [51, 53, 55, 57]  # a count past the end stops at the end (50..59)
    starts = set()
    for seed in range(8):  # training: a random start in the range (what VideoFiles asks read_clip for)
        ids = frame_ids(read_clip(str(tmp_path / "v.mp4"), 4, 2, torch.Generator().manual_seed(seed),
                                  span=train.spans[0]))
        assert 20 <= ids[0] <= 23 and ids == [ids[0] + 2 * k for k in range(4)]
        starts.add(ids[0])
    assert train.spans == [(20, 10), (0, -1), (50, 30)] and len(starts) > 1


def pretraining_list(tmp_path) -> str:
    text = "# VideoMAE V2 pre-training list\n" + "".join(f"{n} 0 -1\n" for n in ("a.mp4", "my clip.mp4"))
    return listing(tmp_path, text + "c.mp4 4 8\n", {"a.mp4": 12, "my clip.mp4": 12, "c.mp4": 20})


def test_an_unlabelled_list_has_no_classes(tmp_path):
    path = pretraining_list(tmp_path)
    train, val, _, info = build_datasets(DataConfig(name="video-csv", path=path, val_path=path, **CLIP))
    assert info.num_classes == 0 and [val[i]["y"] for i in range(3)] == [0, 0, 0]
    assert [Path(p).name for p, _ in val.samples] == ["a.mp4", "my clip.mp4", "c.mp4"]
    assert frame_ids(val[2]["x"]) == [4, 6, 8, 10]


@pytest.mark.slow
def test_an_unlabelled_list_pretrains_but_trains_no_classifier(tmp_path, capsys):
    data = [f"--data.path={pretraining_list(tmp_path)}", "--data.name=video-csv", "--data.frames=1",
            "--train.batch=2"]
    assert main(["pretrain", "--out", str(tmp_path / "mae"), *FAST, *data]) == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["train", "--out", str(tmp_path / "sup"), *FAST, *data])  # a classifier needs labels
    assert refused(code, capsys.readouterr().err, "2 classes")


@pytest.mark.parametrize("line, words", [
    ("b.mp4 -3 -1 1", ["first frame"]), ("b.mp4 0 0 1", ["frame count"]), ("b.mp4 0 -2 1", ["frame count"]),
    ("b.mp4 0 10 -1", ["class id"]), ("b.mp4,-1", ["class id"]), ("b.mp4 zero", ["path start count"]),
    ("b.mp4 0 -1", ["no label", "list.txt:1"]), ("frames 1 58 1", ["folder"])])
def test_a_malformed_line_is_refused_naming_the_file_and_line(tmp_path, capsys, line, words):
    path = listing(tmp_path, f"a.mp4 0 -1 0\n{line}\n", {"a.mp4": 4, "b.mp4": 4})
    (tmp_path / "frames").mkdir()  # VideoMAE V2's frames-as-images folders are not read
    code = main(["train", "--out", str(tmp_path / "run"), *FAST, f"--data.path={path}",
                 "--data.name=video-csv"])
    assert refused(code, capsys.readouterr().err, "list.txt:2", *words)


def test_an_unlabelled_list_takes_no_class_count(tmp_path, capsys):
    path = listing(tmp_path, "a.mp4 0 -1\nb.mp4 0 -1\n", {"a.mp4": 4, "b.mp4": 4})
    code = main(["pretrain", "--out", str(tmp_path / "run"), *FAST, f"--data.path={path}",
                 "--data.name=video-csv", "--data.num_classes=5"])
    assert refused(code, capsys.readouterr().err, "list.txt", "data.num_classes")


def test_a_range_past_the_video_is_skipped_saying_why(tmp_path):
    path = listing(tmp_path, "v.mp4 0 -1 0\nv.mp4 100 -1 0\n", {"v.mp4": 12})
    cfg = dict(name="video-csv", path=path, val_path=path, **CLIP)
    _, val, _, _ = build_datasets(DataConfig(**cfg))
    assert val[0] and not val[1] and "past its end (12 frames)" in val[1].reason
    with pytest.raises(UnreadableFileError, match="past its end"):
        build_datasets(DataConfig(**cfg, strict=True))[1][1]
    assert torch.equal(val[0]["x"], build_datasets(DataConfig(**cfg))[1][0]["x"])
