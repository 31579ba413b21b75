import itertools
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitscale.data import (
    DIRECTIONS,
    ClipTransform,
    DataConfig,
    EpochSampler,
    Skipped,
    UnreadableFileError,
    build_datasets,
    collate,
    denormalize,
    generated,
    make_loader,
    sample_seed,
    transforms_for,
)
from vitscale.data.builtin import sklearn_digits
from vitscale.data.transforms import center_crop_box, random_resized_crop_box
from vitscale.data.video import clip_indices, read_clip

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # items in [0, 1], easy to inspect


def same(a, b) -> bool:
    return torch.equal(a["x"], b["x"]) and a["y"] == b["y"] and a["index"] == b["index"]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, words", [
    (dict(name="cifar"), "data.name"),
    (dict(name="image-folder"), "data.path"),
    (dict(name="moving-digits", label="direction", frames=1), "frames"),
    (dict(name="moving-digits", label="direction", frames=4, hflip=True), "hflip=false"),
    (dict(label="direction"), "moving-digits"),
    (dict(name="image-folder", path="x", frames=4), "frames=1"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(mean=(0.5,)), "3 values"),
])
def test_config_errors_say_what_to_do(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DataConfig(**kwargs)


def test_direction_labels_need_the_frames_the_model_gives():
    """data.frames=0 takes the model's frames: an image model (1 frame) cannot learn motion."""
    directions = DataConfig(name="moving-digits", label="direction")
    with pytest.raises(ValueError, match="needs motion"):
        directions.sized(32, frames=1)
    assert directions.sized(32, frames=4).frames == 4


# ----------------------------------------------------------------------------- digits
def test_digits_split_sizes_disjoint_and_labels():
    train, val, test, info = build_datasets(DataConfig(image_size=32, **RAW))
    assert len(train) + len(val) + len(test) == 1797 and abs(len(val) - 0.2 * 1797) < 10
    assert abs(len(test) - 0.1 * 1797) < 10  # data.test_fraction's default for digits
    for a, b in ((train, val), (train, test), (val, test)):
        assert not set(a.members) & set(b.members)
    # The test split is carved from what training kept: val is what it was without one.
    _, val_alone, no_test, _ = build_datasets(DataConfig(image_size=32, test_fraction=0.0, **RAW))
    assert val.members == val_alone.members and len(no_test) == 0
    assert (info.num_classes, info.in_chans, info.frames) == (10, 3, 1)
    images, labels = sklearn_digits()
    item = val[5]
    assert item["x"].shape == (3, 32, 32) and item["x"].dtype == torch.float32
    assert item["y"] == int(labels[val.members[5]]) and item["index"] == 5
    assert torch.equal(item["x"][0], item["x"][2])  # gray repeated
    assert item["x"].min() >= 0 and item["x"].max() <= 1
    # Each class is held out in the same share (stratified).
    val_counts = np.bincount([val.labels[i] for i in range(len(val))], minlength=10)
    assert val_counts.min() >= 30


def test_digits_keys_are_deterministic():
    a, va, _, _ = build_datasets(DataConfig())
    b, vb, _, _ = build_datasets(DataConfig())
    assert a.members == b.members and va.members == vb.members
    assert same(a[(3, 11)], b[(3, 11)])
    assert not torch.equal(a[(3, 11)]["x"], a[(3, 12)]["x"])
    assert same(va[4], vb[(4, None)])
    other, _, _, _ = build_datasets(DataConfig(seed=1))
    assert other.members != a.members


# ----------------------------------------------------------------------------- moving digits
def moving(**kw):
    cfg = dict(name="moving-digits", frames=8, num_clips=200, scale_min=1.0, **RAW)
    return build_datasets(DataConfig(**{**cfg, **kw}))


def centroids(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W] weights -> [T, 2] (y, x) centroids."""
    t, h, w = frames.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    f = frames.double()
    m = f.sum((1, 2))
    return torch.stack([(f * ys).sum((1, 2)) / m, (f * xs).sum((1, 2)) / m], 1)


@pytest.mark.parametrize("digits_per_clip", [1, 2])
def test_moving_digits_direction_matches_motion(digits_per_clip):
    train, val, _, info = moving(label="direction", digits_per_clip=digits_per_clip)
    assert info.class_names == DIRECTIONS and info.num_classes == 8
    seen = set()
    for i in range(len(val)):
        item = val[i]
        assert item["x"].shape == (3, 8, 32, 32)
        frames = item["x"][0]
        if digits_per_clip == 2:
            frames = frames * (frames > 0.6)  # the labelled digit is the bright one
        c = centroids(frames[:4])  # the first half of the clip is free of bounces
        dy, dx = (c[3] - c[0]).tolist()
        k = item["y"]
        ey, ex = -math.sin(k * math.pi / 4), math.cos(k * math.pi / 4)
        for d, e in ((dy, ey), (dx, ex)):
            assert (abs(d) < 0.5) if abs(e) < 1e-6 else (d * e > 1.0), (i, k, dy, dx)
        seen.add(k)
    assert seen == set(range(8))


def test_moving_digits_determinism_split_and_shapes():
    train, val, test, _ = moving()
    again, val_again, _, _ = moving()
    assert (len(train), len(val), len(test)) == (140, 40, 20)
    assert same(train[(7, 3)], again[(7, 3)]) and same(val[2], val_again[(2, None)])
    shifted, _, _, _ = moving(seed=1)
    assert not torch.equal(train[7]["x"], shifted[7]["x"])
    cropped, _, _, _ = moving(scale_min=0.35)
    assert not torch.equal(cropped[(7, 1)]["x"], cropped[(7, 2)]["x"])
    assert (test.offset, val.offset) == (len(train), len(train) + len(test))  # disjoint clip ids
    for a, b in ((train, val), (train, test), (val, test)):
        assert not set(a.sources) & set(b.sources)  # disjoint source images
    frames, digit, _ = train.clip(0)
    assert train[0]["y"] == digit and 0 <= digit <= 9
    info = moving(mean=(0.5,) * 3, std=(0.25,) * 3)[3]
    x = train[0]["x"]
    assert torch.allclose(denormalize((x - 0.5) / 0.25, info), x, atol=1e-6)  # a clip
    assert torch.allclose(denormalize((x[:, 1] - 0.5) / 0.25, info), x[:, 1], atol=1e-6)  # one frame
    image, _, _, _ = moving(frames=1)
    assert image[0]["x"].shape == (3, 32, 32)


# ----------------------------------------------------------------------------- transforms
def test_transform_same_crop_and_flip_for_every_frame():
    base = torch.rand(3, 1, 40, 48)
    clip = base * torch.linspace(0.2, 1.0, 5).view(1, 5, 1, 1)  # frame t = base * gain_t
    tf = ClipTransform(24, **RAW, scale=(0.2, 1.0), flip=True)
    for seed in range(8):
        out = tf(clip, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 5, 24, 24)
        assert torch.allclose(out, out[:, -1:] * torch.linspace(0.2, 1.0, 5).view(1, 5, 1, 1), atol=1e-5)


def test_transform_generator_determinism_and_eval():
    x = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    tf = ClipTransform(32, mean=(0.5,) * 3, std=(0.25,) * 3, flip=True, eval_crop=0.875)
    state = torch.get_rng_state()
    a = tf(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, tf(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, tf(x, torch.Generator().manual_seed(2)))
    assert torch.equal(tf(x, None), tf(x, None)) and tf(x, None).shape == (3, 32, 32)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert center_crop_box(50, 70, 0.875) == (3, 13, 44, 44)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(50, 70, (0.35, 1.0), (3 / 4, 4 / 3), gen)
        assert top >= 0 and top + h <= 50 and left >= 0 and left + w <= 70
        assert 0.3 * 3500 <= h * w <= 3500


# ----------------------------------------------------------------------------- image folders
def write_images(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    red = np.zeros((40, 30, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "cat" / "red.jpg", quality=95)
    Image.fromarray(red).convert("RGBA").save(root / "cat" / "rgba.png")
    Image.fromarray(np.full((20, 20), 128, np.uint8), "L").save(root / "cat" / "gray.png")
    pal = Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20) % 4, "P")
    pal.putpalette([0, 0, 255] * 256)
    pal.save(root / "dog" / "palette.png", transparency=0)
    Image.fromarray(red[..., ::-1].copy()).save(root / "dog" / "nested" / "blue.webp")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored")


def test_image_folder_reads_modes_and_skips_corrupt(tmp_path):
    write_images(tmp_path / "train")
    cfg = DataConfig(name="image-folder", path=str(tmp_path / "train"), val_path=str(tmp_path / "train"),
                     image_size=16, **RAW)
    train, val, _, info = build_datasets(cfg)
    assert info.class_names == ("cat", "dog") and len(val) == 6
    items = [val[i] for i in range(len(val))]
    names = [Path(p).name for p, _ in val.samples]
    bad = names.index("broken.jpg")
    assert isinstance(items[bad], Skipped) and not items[bad]
    assert all(it["x"].shape == (3, 16, 16) for i, it in enumerate(items) if i != bad)
    red = items[names.index("red.jpg")]["x"]
    assert red[0].mean() > 0.9 and red[1:].mean() < 0.1 and items[names.index("red.jpg")]["y"] == 0
    assert items[names.index("blue.webp")]["x"][2].mean() > 0.9
    batch = collate(items)
    assert batch["x"].shape == (5, 3, 16, 16) and batch["skipped"] == [str(val.samples[bad][0])]
    assert batch["index"].tolist() == [i for i in range(6) if i != bad]
    assert train[(0, 3)]["x"].shape == (3, 16, 16)
    strict, _, _, _ = build_datasets(DataConfig(**{**cfg.__dict__, "strict": True}))
    with pytest.raises(UnreadableFileError, match="broken.jpg"):
        strict[[p for p, _ in strict.samples].index(val.samples[bad][0])]


def test_bad_paths_raise_one_clear_error(tmp_path):
    def build(name, path):
        return build_datasets(DataConfig(name=name, path=str(path)))

    with pytest.raises(ValueError, match="does not exist"):
        build("image-folder", tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        build("image-folder", tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        build("image-folder", tmp_path)
    with pytest.raises(ValueError, match="no video files"):
        build("video-folder", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        build("video-csv", tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no `path,label` lines"):
        build("video-csv", tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("a.mp4,1\nb.mp4,dog\n")
    with pytest.raises(ValueError, match="list.csv:2"):
        build("video-csv", tmp_path / "list.csv")


# ----------------------------------------------------------------------------- video
def write_video(path: Path, n: int, codec: str = "mpeg4", gop: int = 8) -> None:
    """Frame k is uniform gray 10 + 4k (decodes back to within ~1 level)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        s.codec_context.gop_size = gop
        s.options = {"qmin": "1", "qmax": "1"} if codec == "mpeg4" else {}
        for k in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 + 4 * k, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_ids(x: torch.Tensor) -> list[int]:
    """[C, T, H, W] in [0, 1] (or uint8) -> encoded source frame numbers."""
    v = x.float() * (255 if x.is_floating_point() else 1)
    return [round((m - 10) / 4) for m in v.mean((0, 2, 3)).tolist()]


@pytest.mark.parametrize("name", ["long.mp4", "long.mkv"])
def test_clip_sampling_decodes_the_right_frames(tmp_path, name):
    path = tmp_path / name
    write_video(path, 60, "mpeg4" if name.endswith("mp4") else "ffv1")
    assert frame_ids(read_clip(str(path), 4, 3, None)) == [25, 28, 31, 34]  # centered, seeks
    assert frame_ids(read_clip(str(path), 8, 2, None)) == list(range(22, 37, 2))
    for seed in range(4):
        ids = frame_ids(read_clip(str(path), 4, 5, torch.Generator().manual_seed(seed)))
        start = clip_indices(60, 4, 5, torch.Generator().manual_seed(seed))[0]
        assert ids == [start + 5 * k for k in range(4)] and 0 <= start <= 45
    short = tmp_path / f"short{path.suffix}"
    write_video(short, 5, "mpeg4" if name.endswith("mp4") else "ffv1")
    assert frame_ids(read_clip(str(short), 4, 2, None)) == [0, 2, 4, 4]  # padded with the last frame


def test_video_folder_and_csv(tmp_path):
    for cls, n in (("jump", 12), ("run", 20)):
        (tmp_path / "videos" / cls).mkdir(parents=True)
        for j in range(2):
            write_video(tmp_path / "videos" / cls / f"{j}.mp4", n)
    (tmp_path / "videos" / "run" / "bad.mp4").write_bytes(b"garbage")
    cfg = dict(name="video-folder", path=str(tmp_path / "videos"), val_path=str(tmp_path / "videos"),
               frames=4, frame_stride=2, image_size=16, **RAW)
    train, val, _, info = build_datasets(DataConfig(**cfg))
    assert info.class_names == ("jump", "run") and info.frames == 4 and len(val) == 5
    batch = collate([val[i] for i in range(len(val))])
    assert batch["x"].shape == (4, 3, 4, 16, 16) and batch["y"].tolist() == [0, 0, 1, 1]
    assert [Path(p).name for p in batch["skipped"]] == ["bad.mp4"]
    # Center clips: span (4 - 1) * 2 + 1 = 7 frames, starting at (12 - 7) // 2 and (20 - 7) // 2.
    assert frame_ids(batch["x"][0]) == [2, 4, 6, 8] and frame_ids(batch["x"][2]) == [6, 8, 10, 12]
    assert same(train[(1, 9)], train[(1, 9)])
    with pytest.raises(UnreadableFileError, match="bad.mp4"):
        build_datasets(DataConfig(**{**cfg, "strict": True}))[1][4]
    rows = ["path,label", f"{tmp_path}/videos/jump/0.mp4,0", "videos/run/1.mp4 1", "",
            "videos/jump/1.mp4, 2"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    csv = str(tmp_path / "list.csv")
    train, val, _, info = build_datasets(DataConfig(**{**cfg, "name": "video-csv", "path": csv,
                                                    "val_path": csv}))
    assert info.num_classes == 3 and [val[i]["y"] for i in range(3)] == [0, 1, 2]
    one, _, _, _ = build_datasets(DataConfig(**{**cfg, "frames": 1}))
    assert one[0]["x"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- sampler, loader
def test_epoch_sampler_order_shards_and_resume():
    keys = list(EpochSampler(10, seed=3, epoch=1))
    assert keys == list(EpochSampler(10, seed=3, epoch=1))
    assert [i for i, _ in keys] != [i for i, _ in EpochSampler(10, seed=3, epoch=2)]
    assert sorted(i for i, _ in keys) == list(range(10))
    assert all(s == sample_seed(3, 1, i) for i, s in keys)
    ranks = [EpochSampler(10, seed=3, epoch=1, rank=r, world=3) for r in range(3)]
    shards = [[i for i, _ in r] for r in ranks]
    assert [len(s) for s in shards] == [4, 4, 4] and set(sum(shards, [])) == set(range(10))
    assert sorted(sum(shards, [])) != list(range(10))  # two wrapped duplicates
    cut = [[i for i, _ in EpochSampler(10, 3, 1, rank=r, world=3, drop_last=True)] for r in range(3)]
    assert [len(s) for s in cut] == [3, 3, 3] and len(set(sum(cut, []))) == 9
    full = list(ranks[1])
    assert list(EpochSampler(10, 3, 1, rank=1, world=3, start=3)) == full[3:]
    assert len(EpochSampler(10, 3, 1, rank=1, world=3, start=3)) == 1
    assert list(EpochSampler(4, None, shuffle=False)) == [(0, None), (1, None), (2, None), (3, None)]
    with pytest.raises(ValueError, match="shuffle"):
        EpochSampler(4, None)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_follow_keys(workers):
    train, _, _, info = build_datasets(DataConfig())
    sampler = EpochSampler(len(train), seed=0, epoch=0)
    state = torch.get_rng_state()
    loader = make_loader(train, sampler, batch_size=8, workers=workers, device_type="cpu")
    batches = list(itertools.islice(loader, 2))
    assert torch.equal(torch.get_rng_state(), state)
    keys = sampler.keys()[:16]
    assert torch.cat([b["index"] for b in batches]).tolist() == [i for i, _ in keys]
    assert torch.equal(batches[1]["x"][3], train[keys[11]]["x"])
    assert batches[0]["x"].shape == (8, 3, 32, 32) and batches[0]["skipped"] == []
    pic = denormalize(batches[0]["x"], info)
    assert pic.min() >= 0 and pic.max() <= 1
    assert collate([None, Skipped("a.jpg", "bad")])["x"].numel() == 0


# ----------------------------------------------------------------------------- cluttered digits
def cluttered(**kw):
    cfg = dict(name="cluttered-digits", image_size=32, train_size=1500, val_size=1100, scale_min=1.0, **RAW)
    return build_datasets(DataConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("kwargs, words", [
    (dict(train_size=0), "data.train_size"),
    (dict(val_size=0), "data.val_size"),
    (dict(canvas=8), "data.canvas"),
    (dict(name="cluttered-digits", frames=4), "frames=1"),
])
def test_cluttered_config_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DataConfig(**kwargs)


def test_cluttered_sizes_labels_and_builtin_transforms():
    train, val, _, info = cluttered()
    assert (len(train), len(val)) == (1500, 1100)
    assert (info.num_classes, info.in_chans, info.frames, info.mean) == (10, 3, 1, (0.0, 0.0, 0.0))
    _, labels = sklearn_digits()
    item = val[1050]  # second chunk
    assert item["x"].shape == (3, 32, 32) and item["x"].dtype == torch.float32
    assert torch.equal(item["x"][0], item["x"][2]) and item["index"] == 1050
    scene = val.scene(1050 // generated.CHUNK)
    assert item["y"] == int(labels[scene.source[1050 % generated.CHUNK]])
    assert sorted({val[i]["y"] for i in range(200)}) == list(range(10))
    # scale_min=1: the train item is the whole image, whatever the sample seed, so the eval item.
    assert torch.equal(train[(7, 1)]["x"], train[(7, 2)]["x"])
    assert torch.equal(train[(7, 1)]["x"], train[7]["x"])
    assert transforms_for(DataConfig(name="cluttered-digits"))[1].eval_crop == 1.0  # built-in: no crop
    _, none, _, _ = cluttered(val_fraction=0.0)
    assert len(none) == 0


def test_cluttered_items_are_pure_functions_of_seed_split_index():
    a, va, _, _ = cluttered()
    b, vb, _, _ = cluttered(train_size=1030, image_size=16)
    c, _, _, _ = cluttered(image_size=16)
    for i in (0, 1023, 1024, 1029):  # either side of a chunk boundary, in a smaller set
        assert torch.equal(b[i]["x"], c[i]["x"]) and b[i]["y"] == a[i]["y"]
    assert torch.equal(va[5]["x"], cluttered()[1][(5, None)]["x"])  # a second instance
    assert not torch.equal(a[5]["x"], va[5]["x"])  # the splits differ
    assert not torch.equal(a[5]["x"], cluttered(seed=1)[0][5]["x"])  # so do the seeds
    # A sample does not depend on the others it is rendered with.
    scene = a.scene(0)
    rows = torch.tensor([3, 700, 1000])
    assert torch.equal(generated.render(scene.take(rows), 32), generated.render(scene, 32)[rows])
    assert torch.equal(a.images(scene.take(rows)), a.chunk(0)[0][rows])


@pytest.mark.parametrize("kw", [dict(), dict(image_size=20), dict(scale_min=0.5), dict(hflip=True)])
def test_cluttered_batches_load_at_once_bit_for_bit(kw):
    """A batch of in-memory rows is one index (KeyedDataset.load_batch): the same bits as the items
    one by one, across chunks and a short last chunk; a transform that draws loads item by item."""
    train, val, _, _ = cluttered(train_size=2100, val_size=1030, **kw)
    keys = EpochSampler(len(train), seed=3, epoch=1, rank=0, world=1).keys()[:300]
    for ds, batch in ((train, keys), (val, [1029, 3, 1024, 3])):
        one_by_one = collate([ds[k] for k in batch])
        at_once = collate(ds.__getitems__(batch))
        assert all(torch.equal(one_by_one[k], at_once[k]) for k in ("x", "y", "index"))
        assert at_once["x"].is_contiguous() and at_once["skipped"] == []
    fixed = kw.get("scale_min", 1) == 1 and not kw.get("hflip")
    assert isinstance(train.__getitems__(keys[:4]), dict) == fixed  # a batch where nothing is drawn
    assert isinstance(val.__getitems__([0, 1]), dict)  # eval draws nothing


def test_cluttered_chunks_render_once_per_process():
    """A study builds new datasets for every run: they share the rendered chunks."""
    cfg = dict(seed=7, train_size=2000)
    first = cluttered(**cfg)[0]
    before = generated.CACHE.renders
    x = first[1500]["x"]
    assert generated.CACHE.renders == before + 1  # chunk 1, rendered
    again = cluttered(**cfg)[0]
    assert torch.equal(again[1500]["x"], x) and again[1200]["y"] == first[1200]["y"]
    assert generated.CACHE.renders == before + 1  # a new instance, no new render
    cluttered(**cfg, image_size=16)[0][1500]
    assert generated.CACHE.renders == before + 2  # another size is another image
    small = generated.ChunkCache(limit=2500)
    for k in range(3):
        small.put(k, (torch.zeros(1000, dtype=torch.uint8), torch.zeros(1)))
    assert 0 not in small and 1 in small and small.bytes == 2000


def test_cluttered_content_is_the_same_at_every_image_size():
    big, _, _, _ = cluttered(image_size=32)
    small, _, _, _ = cluttered(image_size=16)
    x32 = torch.stack([big[i]["x"][0] for i in range(64)])  # [64, 32, 32], uint8 levels / 255
    x16 = torch.stack([small[i]["x"][0] for i in range(64)])
    down = F.interpolate(x32[:, None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    down = down[:, 0]
    assert (x16 - down).abs().max() <= 1.01 / 255  # both rounded to uint8 once
    assert (x16 - x16.roll(1, 0)).abs().max() > 0.5  # and the samples do differ


def test_cluttered_validation_never_shows_a_training_digit():
    train, val, _, _ = cluttered()
    assert not set(train.sources.tolist()) & set(val.sources.tolist())
    assert len(train.sources) + len(val.sources) == 1797
    for ds in (train, val):
        scene = ds.scene(0)
        fragments = scene.piece_source[:, : generated.FRAGMENTS]
        used = set(scene.source.tolist()) | set(fragments.reshape(-1).tolist())
        assert used <= set(ds.sources.tolist())


def test_cluttered_clutter_and_noise_lie_outside_the_target():
    train, _, _, _ = cluttered()
    scene = train.scene(0).take(slice(0, 256))
    # Canvas pixels outside the target's 8x8 box (with the half pixel that bilinear sampling adds).
    c = (torch.arange(32) + 0.5) / 16 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    p = torch.stack([x, y], -1).view(1, -1, 2, 1) - scene.centre.view(-1, 1, 2, 1)  # [N, P, 2, 1]
    q = (torch.linalg.inv(scene.shape)[:, None] @ p)[..., 0]  # [N, P, 2] in the target's units
    outside = (q.abs().amax(-1) > 1.2).view(-1, 32, 32)
    quiet = scene._replace(noise=torch.zeros_like(scene.noise))
    alone = quiet._replace(piece_gain=torch.zeros_like(scene.piece_gain))
    assert generated.render(alone, 32)[outside].max() == 0  # the box holds the whole target
    clutter = generated.render(quiet, 32) * outside
    assert (clutter.amax((1, 2)) > 0.3).float().mean() > 0.8  # clutter outside the box
    noisy = generated.render(scene, 32) - generated.render(quiet, 32)
    assert 0.05 < noisy.std() < 0.3  # and noise everywhere


def test_full_frame_crop_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert random_resized_crop_box(32, 32, (1.0, 1.0), (3 / 4, 4 / 3), gen) == (0, 0, 32, 32)
    assert torch.equal(gen.get_state(), state)


def test_cluttered_worker_processes_render_the_same_items():
    train, _, _, _ = cluttered(seed=11)  # a seed no other test renders
    sampler = EpochSampler(len(train), seed=0, epoch=0)
    loader = make_loader(train, sampler, batch_size=16, workers=2, device_type="cpu")
    before = generated.CACHE.renders
    batch = next(iter(loader))  # rendered in a worker process, from an empty cache
    assert generated.CACHE.renders == before  # the main process rendered nothing
    keys = sampler.keys()[:16]
    assert torch.equal(batch["x"], torch.stack([train[k]["x"] for k in keys]))
    assert batch["y"].tolist() == [train[k]["y"] for k in keys]


def test_the_digits_read_from_their_file_are_scikit_learns_own():
    """sklearn_digits reads scikit-learn's digits.csv.gz without importing scikit-learn (its import
    is slow); what it reads is load_digits's, bit for bit."""
    from sklearn.datasets import load_digits

    images, labels = sklearn_digits()
    d = load_digits()
    assert torch.equal(images, torch.from_numpy(d.images / 16.0).float())
    assert torch.equal(labels, torch.from_numpy(d.target).long()) and images.shape == (1797, 8, 8)
