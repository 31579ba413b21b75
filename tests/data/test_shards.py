"""data.name=webdataset: tar shards read by seeking, checked against the image-folder source."""

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitscale.common.errors import UserError
from vitscale.data import DataConfig, Skipped, UnreadableFileError, build_datasets, make_loader
from vitscale.data import shards as shards_mod
from vitscale.data.shards import expand_braces, shard_paths

CLASSES, PER_CLASS = 3, 4


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """Keep the on-disk index cache in the test's folder, and the in-process one empty."""
    monkeypatch.setenv("VITSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shards_mod, "_indexes", {})
    return tmp_path / "cache"


def pictures() -> list[tuple[str, int, np.ndarray]]:
    """(key, label, uint8 [H, W, 3]) of random pictures of several sizes, class-major."""
    rng = np.random.default_rng(0)
    return [(f"c{c}_{j:02d}", c, rng.integers(0, 256, (20 + j, 24 + c, 3), dtype=np.uint8))
            for c in range(CLASSES) for j in range(PER_CLASS)]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, samples, per_shard: int = 5, label_ext: str = "cls") -> list[str]:
    """Shards folder/s-0.tar, s-1.tar, ... holding KEY.png + KEY.<label_ext>, in the samples' order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(0, len(samples), per_shard):
        path = folder / f"s-{n // per_shard}.tar"
        with tarfile.open(path, "w") as tar:
            for key, label, pixels in samples[n : n + per_shard]:
                add(tar, f"{key}.png", png(pixels))
                text = json.dumps({"label": label}) if label_ext == "json" else str(label)
                add(tar, f"{key}.{label_ext}", text.encode())
        paths.append(str(path))
    return paths


def write_folder(root, samples) -> None:
    for key, label, pixels in samples:
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / str(label) / f"{key}.png")


SPLIT = dict(val_fraction=0.25, test_fraction=0.25, image_size=16, seed=3)


@pytest.mark.parametrize("label_ext", ["cls", "json"])
def test_shards_match_the_folder_source_item_for_item(tmp_path, label_ext):
    samples = pictures()
    write_folder(tmp_path / "folder", samples)
    write_shards(tmp_path / "shards", samples, label_ext=label_ext)
    folder = build_datasets(DataConfig(name="image-folder", path=str(tmp_path / "folder"), **SPLIT))
    tars = build_datasets(DataConfig(name="webdataset", path=str(tmp_path / "shards/s-{0..2}.tar"),
                                     randaugment="rand-m9-mstd0.5-inc1", erase_prob=0.5, **SPLIT))
    assert tars[3].class_names == folder[3].class_names == ("0", "1", "2")
    for a, b in zip(folder[:3], tars[:3], strict=True):
        assert len(a) == len(b) > 0
        keys = [os.path.basename(s[0]).split(".")[0] for s in a.samples]
        assert [s[0].rsplit(":", 1)[1].split(".")[0] for s in b.samples] == keys
        assert a.labels == b.labels
    folder_aug = build_datasets(DataConfig(name="image-folder", path=str(tmp_path / "folder"),
                                           randaugment="rand-m9-mstd0.5-inc1", erase_prob=0.5, **SPLIT))
    for i in range(len(tars[0])):
        x, y = folder_aug[0][(i, 100 + i)], tars[0][(i, 100 + i)]
        assert torch.equal(x["x"], y["x"]) and x["y"] == y["y"] and y["index"] == i
    for a, b in zip(folder[1:3], tars[1:3], strict=True):
        for i in range(len(a)):
            assert torch.equal(a[i]["x"], b[i]["x"])
    pixels = samples[0][2]  # the item's content really is the picture: an eval item at full size
    first = build_datasets(DataConfig(name="webdataset", path=str(tmp_path / "shards"), image_size=20,
                                      eval_crop=1.0, val_fraction=0, mean=(0, 0, 0), std=(1, 1, 1)))[0]
    ref = torch.from_numpy(pixels[:20, 2:22]).permute(2, 0, 1).float() / 255  # center 20 x 20 crop
    assert torch.allclose(first[0]["x"], ref, atol=1e-6)


def test_brace_patterns_folders_and_comma_lists(tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{x,{y,z}}.tar") == ["x.tar", "y.tar", "z.tar"]
    assert expand_braces("{2..0}") == ["2", "1", "0"] and expand_braces("a{b}c") == ["a{b}c"]
    paths = write_shards(tmp_path / "d", pictures())
    assert shard_paths(str(tmp_path / "d"), "data.path") == paths
    spec = f"{tmp_path}/d/s-{{1..2}}.tar, {tmp_path}/d/s-0.tar"
    assert shard_paths(spec, "data.path") == paths[1:] + paths[:1]
    with pytest.raises(UserError, match=r"data.val_path: shard .*s-3.tar' does not exist"):
        shard_paths(f"{tmp_path}/d/s-{{0..3}}.tar", "data.val_path")
    with pytest.raises(UserError, match="must be local files"):
        shard_paths("s3://bucket/s-{0..1}.tar", "data.path")


def test_val_and_test_shards_and_their_order(tmp_path):
    samples = pictures()
    paths = write_shards(tmp_path, samples, per_shard=4)  # one class per shard
    cfg = DataConfig(name="webdataset", path=f"{paths[0]},{paths[1]}", val_path=paths[2], test_path=paths[2],
                     image_size=16, num_classes=3)
    train, val, test, info = build_datasets(cfg)
    assert info.num_classes == 3 and len(train) == 8 and len(val) == len(test) == 4
    assert train.labels == [0] * 4 + [1] * 4 and val.labels == [2] * 4
    assert [s[0] for s in val.samples] == [f"{paths[2]}:{k}.png" for k, _, _ in samples[8:]]
    with pytest.raises(UserError, match=r"s-2.tar:c2_00.png: label 2 is no class id.*0..1"):
        build_datasets(DataConfig(**{**cfg.__dict__, "num_classes": 0}))


def test_corrupt_and_truncated_members_are_skipped_with_their_reason(tmp_path):
    samples = pictures()[:4]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for key, label, pixels in samples:
            add(tar, f"{key}.cls", str(label).encode())
            add(tar, f"{key}.png", b"\x89PNG not really" if key == "c0_01" else png(pixels))
            add(tar, "__meta__", b"ignored")
    data = path.read_bytes()
    cut = data.rindex(png(samples[3][2])[:64]) + 100  # inside the last image
    path.write_bytes(data[:cut])
    cfg = DataConfig(name="webdataset", path=str(path), val_fraction=0, image_size=16)
    with pytest.warns(UserWarning, match=r"s.tar is cut short .*: 4 samples indexed"):
        train = build_datasets(cfg)[0]
    items = [train[i] for i in range(4)]
    assert isinstance(items[1], Skipped) and items[1].path == f"{path}:c0_01.png"
    assert isinstance(items[3], Skipped) and "truncated" in items[3].reason
    assert items[0] and items[2] and items[2]["x"].shape == (3, 16, 16)
    strict = build_datasets(DataConfig(**{**cfg.__dict__, "strict": True}))[0]
    with pytest.raises(UnreadableFileError, match="c0_01.png"):
        strict[1]


@pytest.mark.parametrize("member, words", [
    ("c0_02.png", r"sample 'c0_02' has no image member \(jpg/.*\(it has: cls\)"),
    ("c0_02.cls", r"sample 'c0_02' has no label member \(cls/.*\(it has: png\)"),
])
def test_a_sample_without_image_or_label_names_its_shard_and_key(tmp_path, member, words):
    samples = pictures()[:4]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for key, label, pixels in samples:
            for name, data in ((f"{key}.png", png(pixels)), (f"{key}.cls", str(label).encode())):
                if name != member:
                    add(tar, name, data)
    with pytest.raises(UserError, match=f"{path}: {words}"):
        build_datasets(DataConfig(name="webdataset", path=str(path), val_fraction=0))


def test_bad_labels_and_bad_shards_raise_one_line(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "k.png", png(np.zeros((8, 8, 3), np.uint8)))
        add(tar, "k.txt", b"a cat")
    with pytest.raises(UserError, match=r"s.tar: sample 'k': its txt member must hold a class id"):
        build_datasets(DataConfig(name="webdataset", path=str(path)))
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(UserError, match="gz.tar is not a readable tar shard"):
        build_datasets(DataConfig(name="webdataset", path=str(tmp_path / "gz.tar")))
    with pytest.raises(UserError, match="data.frames=1"):
        DataConfig(name="webdataset", path="x.tar", frames=4)


def test_index_is_cached_per_shard_and_redone_when_it_changes(tmp_path, index_cache, monkeypatch):
    paths = write_shards(tmp_path / "d", pictures(), per_shard=6)
    cfg = DataConfig(name="webdataset", path=str(tmp_path / "d"), val_fraction=0, image_size=16)
    first = build_datasets(cfg)[0]
    assert len(list(index_cache.glob("tar-index/*.json"))) == 2
    real = shards_mod.index_tar
    calls = []
    monkeypatch.setattr(shards_mod, "index_tar", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(shards_mod, "_indexes", {})  # a new process: only the disk cache is left
    again = build_datasets(cfg)[0]
    assert calls == [] and again.samples == first.samples
    write_shards(tmp_path / "d", pictures()[::-1], per_shard=6)
    os.utime(paths[0], ns=(1, 1))  # a different stamp, whatever the clock's resolution
    changed = build_datasets(cfg)[0]
    assert len(calls) == 2 and changed.labels == first.labels[::-1]


def test_workers_read_through_their_own_handles(tmp_path):
    write_shards(tmp_path, pictures(), per_shard=3)
    cfg = DataConfig(name="webdataset", path=str(tmp_path), val_fraction=0, image_size=16)
    train = build_datasets(cfg)[0]
    train[0]  # the main process opens a handle first: forked workers must not share its offset
    keys = [(i, 50 + i) for i in range(len(train))]
    ref = torch.stack([train[k]["x"] for k in keys])
    batches = list(make_loader(train, keys, batch_size=4, workers=2))
    assert torch.equal(torch.cat([b["x"] for b in batches]), ref)
    assert torch.equal(pickle.loads(pickle.dumps(train))[keys[5]]["x"], ref[5])


def test_shards_written_by_webdataset_read_back_identically(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = pictures()
    write_shards(tmp_path / "ours", samples, per_shard=12)
    (tmp_path / "theirs").mkdir()
    with wds.TarWriter(str(tmp_path / "theirs" / "s-0.tar")) as sink:
        for key, label, pixels in samples:
            sink.write({"__key__": key, "png": pixels, "cls": label})
    kw = dict(val_fraction=0.25, image_size=16)
    ours = build_datasets(DataConfig(name="webdataset", path=str(tmp_path / "ours"), **kw))
    theirs = build_datasets(DataConfig(name="webdataset", path=str(tmp_path / "theirs"), **kw))
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert a.labels == b.labels and len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[(i, i)]["x"], b[(i, i)]["x"])


@pytest.mark.slow  # a 2-step training run: 3 to 5 s on a shared CPU
def test_cli_trains_on_shards_and_refuses_a_missing_one_in_one_line(tmp_path, capsys):
    from vitscale.cli import main

    write_shards(tmp_path / "d", pictures(), per_shard=6)
    fast = ["--train.batch=4", "--train.max_steps=2", "--train.threads=1", "--data.image_size=16",
            "--model.patch_size=4", "--train.warmup_epochs=0", "--data.name=webdataset",
            "--data.val_fraction=0"]

    def train(out: str, spec: str) -> int:
        return main(["train", "--out", str(tmp_path / out), *fast, f"--data.path={tmp_path}/d/{spec}"])

    assert train("run", "s-{0..1}.tar") == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())
    capsys.readouterr()
    code = train("run2", "s-{0..2}.tar")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "s-2.tar' does not exist" in err[0] and "data.path" in err[0]
