"""A user's data as it comes (fuzz items 4, 5 and 11 of the own-data issue): every image PIL
reads counts, whatever its format, mode or the case of its extension, and what is left out is
named; a split that leaves validation empty is refused in one line (or, asked for, warned
about); a signal stops an evaluation within a batch, as it stops training."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitscale.cli import main
from vitscale.common import checkpoint, dist, signals
from vitscale.common.errors import Interrupted, UserError
from vitscale.common.records import apply_overrides
from vitscale.data import DataConfig, build_datasets
from vitscale.data.folders import IMAGE_EXTS, read_image, scan_folder
from vitscale.tasks import evaluate
from vitscale.train import engine
from vitscale.train.config import RunConfig

FAST = ["--train.batch=8", "--train.max_steps=2", "--train.threads=1", "--data.image_size=16",
        "--model.patch_size=4", "--model.depth=1", "--train.warmup_epochs=0"]


# ----------------------------------------------------------------------------- item 4: every image PIL reads
def save_gif(path: Path, colours: list[tuple[int, int, int]]) -> None:
    frames = [Image.new("RGB", (12, 10), c).convert("P") for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)


def mixed_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """Class folders of images in other formats, modes and extension cases than .jpg/.png RGB;
    returns {file name: the colour its first frame reads as} for the ones of one colour."""
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    Image.new("RGB", (16, 12), (200, 10, 10)).save(cat / "a.tif")
    Image.fromarray(np.full((9, 14), 65535, np.uint16)).save(cat / "b.TIFF")  # I;16 white
    save_gif(cat / "c.gif", [(0, 0, 255), (0, 255, 0)])  # blue first, then green
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(cat / "d.JPG")  # CMYK white
    Image.new("LA", (11, 13), (128, 255)).save(dog / "e.png")
    Image.new("RGBA", (15, 10), (10, 200, 10, 255)).save(dog / "f.tiff")
    Image.new("L", (10, 10), 77).save(dog / "g.WebP")
    Image.new("RGB", (10, 10), (0, 51, 102)).convert("P").save(dog / "h.bmp")  # a web-palette colour
    (dog / "notes.txt").write_text("not an image")
    (dog / "labels.csv").write_text("x,y")
    return {"a.tif": (200, 10, 10), "b.TIFF": (255, 255, 255), "c.gif": (0, 0, 255),
            "e.png": (128, 128, 128), "f.tiff": (10, 200, 10), "g.WebP": (77, 77, 77), "h.bmp": (0, 51, 102)}


def test_every_image_pil_reads_counts_and_the_rest_is_named(tmp_path):
    colours = mixed_folder(tmp_path / "data")
    with pytest.warns(UserWarning, match="skipped 2 file") as said:
        samples, classes = scan_folder(str(tmp_path / "data"), IMAGE_EXTS)
    assert classes == ("cat", "dog")
    assert sorted(Path(f).name for f, _ in samples) == ["a.tif", "b.TIFF", "c.gif", "d.JPG", "e.png",
                                                         "f.tiff", "g.WebP", "h.bmp"]
    text = " ".join(str(w.message) for w in said)
    assert "notes.txt" in text and "labels.csv" in text
    for f, _ in samples:
        x = read_image(f, None)
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and x.ndim == 3, f
        want = colours.get(Path(f).name)
        if want is not None:  # JPEG (CMYK) is lossy: its colour is checked loosely below
            assert tuple(x[:, 0, 0].tolist()) == want, f
    cmyk = read_image(str(tmp_path / "data" / "cat" / "d.JPG"), None)
    assert cmyk.float().mean() > 240  # white, not inverted or black


def test_a_folder_of_tiff_and_gif_alone_trains(tmp_path, capsys):
    data = tmp_path / "data"
    for c, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(6):
            if i % 2:
                Image.new("RGB", (20, 20), colour).save(data / f"c{c}" / f"{i}.TIF")
            else:
                save_gif(data / f"c{c}" / f"{i}.gif", [colour, (9, 9, 9)])
    args = ["train", "--out", str(tmp_path / "run"), "--data.name=image-folder", f"--data.path={data}",
            "--data.val_fraction=0.34", *FAST]
    assert main(args) == 0, capsys.readouterr().err
    train, val, _, info = build_datasets(DataConfig(name="image-folder", path=str(data), image_size=16,
                                                    val_fraction=0.34))
    assert info.num_classes == 2 and (len(train), len(val)) == (8, 4)


# ----------------------------------------------------------------------------- item 5: empty validation
def one_image_classes(root: Path, n: int) -> Path:
    for c in range(n):
        (root / f"class{c:04d}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (c % 256, 0, 0)).save(root / f"class{c:04d}" / "only.png")
    return root


@pytest.mark.parametrize("classes", [1, 300])
def test_a_split_that_leaves_validation_empty_is_refused(tmp_path, capsys, classes):
    data = one_image_classes(tmp_path / "data", classes)
    with pytest.raises(UserError, match="holds out no item") as e:
        build_datasets(DataConfig(name="image-folder", path=str(data), image_size=16))
    for what in ("add images", "data.val_path", "data.val_fraction=0"):
        assert what in str(e.value)
    args = ["train", "--out", str(tmp_path / "run"), "--data.name=image-folder", f"--data.path={data}", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds out no item" in err, err
    assert not (tmp_path / "run").exists()


def test_no_validation_asked_for_is_one_warning_of_what_is_missing(tmp_path, capsys):
    data = one_image_classes(tmp_path / "data", 8)
    args = ["train", "--out", str(tmp_path / "run"), "--data.name=image-folder", f"--data.path={data}",
            "--data.val_fraction=0", *FAST]
    assert main(args) == 0
    err = capsys.readouterr().err  # a warning: on stderr
    said = [line for line in err.splitlines() if "no validation" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and "best/" in said[0], err


def test_a_val_folder_keeps_validation_whatever_the_fraction(tmp_path):
    data = one_image_classes(tmp_path / "data", 3)
    val = one_image_classes(tmp_path / "val", 3)
    _, got, _, _ = build_datasets(DataConfig(name="image-folder", path=str(data), val_path=str(val),
                                             image_size=16))
    assert len(got) == 3


# ----------------------------------------------------------------------------- item 11: signal in evaluation
def _eval_config(batch: int) -> RunConfig:
    return apply_overrides(RunConfig(), [f"train.batch={batch}", "data.image_size=16", "model.patch_size=4"])


def test_a_signal_stops_an_evaluation_at_the_next_batch(tmp_path):
    """Some 360 items in batches of 4: a SIGINT during batch 3 stops it before batch 4."""
    _, items, _, _ = build_datasets(DataConfig(image_size=16, val_fraction=0.2))
    assert len(items) > 300
    seen = []

    def fn(x):
        seen.append(len(x))
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(len(x), 2)

    with signals.deferred(), pytest.raises(Interrupted, match="SIGINT during evaluation"):
        evaluate.outputs(fn, items, _eval_config(4), dist.Dist())
    assert len(seen) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def small_run(tmp_path, *overrides: str) -> RunConfig:
    """A run of batches of 16 on generated data, a few steps an epoch."""
    small = ["data.name=cluttered-digits", "train.batch=16", "train.max_steps=0", "train.threads=1",
             "data.image_size=16", "model.patch_size=4", "model.depth=1", "train.warmup_epochs=0"]
    return apply_overrides(RunConfig(out=str(tmp_path / "run")), [*small, *overrides])


def test_a_run_signalled_during_evaluation_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    """SIGTERM while epoch 2 is evaluated: Interrupted, the checkpoint of epoch 1 kept (the epoch
    is trained again on resume), and the run resumes to its end."""
    cfg = small_run(tmp_path, "data.train_size=64", "data.val_size=256", "train.epochs=3")
    # 4 steps an epoch; val: 16 batches
    real = evaluate.indexed_outputs
    calls = []

    def outputs(fn, *args, **kwargs):
        def counted(x):
            calls.append(len(x))
            if len(calls) == 16 + 2:  # epoch 2's evaluation, its second batch
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(x)
        return real(counted, *args, **kwargs)

    monkeypatch.setattr(evaluate, "indexed_outputs", outputs)
    with pytest.raises(Interrupted, match="SIGTERM during evaluation at step 8 of 12.*resume") as e:
        engine.train(cfg)
    assert len(calls) == 16 + 2  # not one batch after the signal
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "run")) == 4
    assert str(checkpoint.latest(tmp_path / "run")) in str(e.value)
    final = engine.train(cfg).metrics
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "run")) == 12 and "val_top1" in final


def test_a_run_signalled_in_its_first_evaluation_says_it_starts_over(tmp_path, monkeypatch):
    cfg = small_run(tmp_path, "data.train_size=32", "data.val_size=64", "train.epochs=1")
    real = evaluate.indexed_outputs

    def outputs(fn, *args, **kwargs):
        def signalled(x):
            os.kill(os.getpid(), signal.SIGINT)
            return fn(x)
        return real(signalled, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(evaluate, "indexed_outputs", outputs)
        with pytest.raises(Interrupted, match="SIGINT during evaluation at step 2 of 2, no checkpoint yet"):
            engine.train(cfg)
    assert checkpoint.latest(tmp_path / "run") is None
    assert "val_top1" in engine.train(cfg).metrics
