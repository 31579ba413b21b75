"""End to end on folders as users have them: class folders of JPEG, PNG, WebP, TIFF and GIF files of
mixed sizes and modes (RGB, L, RGBA, P), class folders of mp4 videos (PyAV), and a flat folder of
unlabelled images. Each goes through the commands a user runs, in-process as `vitscale ...`:
train (pretrain) -> eval -> predict -> export (ONNX, and HF through convert) -> study --plan, and
each step is checked against what the data holds (every file read, the class names in every
output) and, for the exports, against the run's own model on a real file."""

import json
import math
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import vitscale
from vitscale.cli import main

pytestmark = pytest.mark.slow  # each flow trains a few steps and exports (~30-60 s on a busy 2-core CPU)

# One block: the flows' subject is the data and the commands; every block exports and converts alike,
# and the export's tracing costs seconds a block
QUICK = ["--train.max_steps=3", "--train.threads=1", "--train.warmup_epochs=0", "--model.depth=1"]
# name, mode, size (w, h): every format and mode a user's folder may mix, .TIFF in capitals too
IMAGES = [("a.jpg", "RGB", (40, 30)), ("b.png", "L", (64, 64)), ("c.webp", "RGBA", (50, 70)),
          ("d.tif", "P", (33, 45)), ("e.gif", "P", (60, 40)), ("f.TIFF", "RGB", (45, 45)),
          ("g.jpeg", "L", (80, 36)), ("h.png", "P", (36, 52)), ("i.webp", "RGB", (28, 28)),
          ("j.tiff", "RGBA", (44, 60))]
COLORS = {"cat": (220, 60, 40), "dog": (40, 200, 60), "fish": (40, 70, 220)}
MOTIONS = {"left": -3, "right": 3}
VIDEO_SIZES = [(32, 32), (48, 32), (40, 24), (32, 48), (64, 40)]  # (w, h), even for yuv420p


def picture(rng: np.random.Generator, color: tuple[int, ...], size: tuple[int, int],
            mode: str) -> Image.Image:
    """A noisy image of the class's colour, converted to `mode` (P: an adaptive palette)."""
    w, h = size
    rgb = Image.fromarray((np.array(color) * 0.7 + rng.uniform(0, 76, (h, w, 3))).astype(np.uint8), "RGB")
    if mode == "RGBA":
        rgb.putalpha(Image.fromarray(rng.integers(128, 256, (h, w), dtype=np.uint8)))
        return rgb
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return rgb.convert(mode)


def write_video(path: Path, size: tuple[int, int], step: int, rng: np.random.Generator) -> None:
    """12 frames (mpeg4 in mp4) of a bright bar moving `step` pixels a frame over noise."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(12):
            frame = rng.uniform(0, 96, (h, w, 3)).astype(np.uint8)
            x = (w // 2 + step * t) % (w - 8)
            frame[:, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """images/CLASS/ (10 files each), flat/ (the same 30 files, no classes), videos/CLASS/ (5 mp4 each)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / "images" / name).mkdir(parents=True)
        (root / "flat").mkdir(exist_ok=True)
        for file, mode, size in IMAGES:
            image = picture(rng, color, size, mode)
            image.save(root / "images" / name / file)
            image.save(root / "flat" / f"{name}-{file}")
    for name, step in MOTIONS.items():
        (root / "videos" / name).mkdir(parents=True)
        for i, size in enumerate(VIDEO_SIZES):
            write_video(root / "videos" / name / f"clip{i}.mp4", size, step, rng)
    return root


def vitscale_ok(capsys, *args: str) -> str:
    """`vitscale ARGS` in this process: its stdout, once it exited 0."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, f"vitscale {' '.join(args)}: exit {code}: {out.err[-2000:]}"
    return out.out


def items_read(log: str) -> int:
    """Train plus val plus test items, from the run's first line ('...: 24 train, 6 val, 0 test items')."""
    found = re.search(r"(\d+) train, (\d+) val, (\d+) test items", log)
    assert found, log
    return sum(int(n) for n in found.groups())


def study_plan(capsys, model: str, data: Path, *extra: str) -> dict:
    """`vitscale study --plan --json` on the folder; checks it wrote nothing."""
    out = data.parent / f"study-{data.name}"
    plan = json.loads(vitscale_ok(capsys, "study", "--model", model, "--data.name=" + _kind(data),
                                  f"--data.path={data}", "--plan", "--json", "--out", str(out), *extra))
    assert not out.exists()  # --plan writes nothing
    return plan


def _kind(data: Path) -> str:
    return "video-folder" if data.name == "videos" else "image-folder"


def check_exports(capsys, run: Path, tmp_path: Path, names: list[str], sample: Path, hf_class: str) -> None:
    """ONNX: the sidecar names the logits, and onnxruntime's output on `sample` is the run's model's;
    HF (convert --to hf): id2label names them, and transformers' model gives the run's logits."""
    import onnxruntime
    import transformers

    loaded = vitscale.load_run(run)
    x = loaded.preprocess(sample)[None]  # [1, C, (T,) H, W] as the run evaluates
    with torch.no_grad():
        want = loaded.model(x)
    vitscale_ok(capsys, "export", str(run), "--to", "onnx")
    sidecar = json.loads((run / "model.onnx.json").read_text())
    assert sidecar["classes"] == names and sidecar["output"]["shape"] == ["batch", len(names)]
    session = onnxruntime.InferenceSession(str(run / "model.onnx"))
    (got,) = session.run(None, {sidecar["input"]["name"]: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
    hf = tmp_path / "hf"
    vitscale_ok(capsys, "convert", str(run), "--to", "hf", str(hf))
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["architectures"] == [hf_class]
    model = getattr(transformers, hf_class).from_pretrained(hf).eval()
    assert model.config.id2label == dict(enumerate(names))
    pixels = x.transpose(1, 2) if x.ndim == 5 else x  # VideoMAE takes [B, T, C, H, W]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def check_predictions(rows: list[dict], files: int, names: list[str], k: int) -> None:
    """`predict --json`: a row a file, its k classes named as the run's, most probable first."""
    assert len(rows) == files
    for row in rows:
        classes = [t["class"] for t in row["top"]]
        probs = [t["probability"] for t in row["top"]]
        assert len(classes) == k and set(classes) <= set(names)
        assert [names[t["id"]] for t in row["top"]] == classes
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_a_folder_of_image_classes_end_to_end(folders, tmp_path, capsys):
    images, run, names = folders / "images", tmp_path / "run", sorted(COLORS)
    log = vitscale_ok(capsys, "train", "--model", "pico/4", "--data.name=image-folder",
                      f"--data.path={images}", "--train.batch=8", "--out", str(run), *QUICK)
    first = log.splitlines()[0]
    assert "at 32 px" in first and "3 classes" in first, first  # pico/4's own size, the folder's classes
    assert items_read(first) == len(COLORS) * len(IMAGES)  # every file, every format and mode
    assert json.loads((run / "classes.json").read_text()) == names

    result = json.loads(vitscale_ok(capsys, "eval", str(run), "--json"))
    assert result["classes"] == names and 0 <= result["val_top1"] <= 1 and math.isfinite(result["val_loss"])

    files = [images / "cat" / "d.tif", images / "fish" / "e.gif", images / "cat" / "c.webp",
             images / "fish" / "f.TIFF"]
    rows = json.loads(vitscale_ok(capsys, "predict", str(run), *map(str, files), str(images / "dog"),
                                  "--top-k", "2", "--json"))
    check_predictions(rows, len(files) + len(IMAGES), names, 2)
    assert [r["file"] for r in rows[:4]] == list(map(str, files))

    check_exports(capsys, run, tmp_path, names, images / "fish" / "e.gif", "ViTForImageClassification")

    plan = study_plan(capsys, "pico/4", images, "--train.batch=8")
    assert plan["base"] | {"preset": "pico/4"} == {"preset": "pico/4", "side": 32, "frames": 1, "patch": 4,
                                                   "tokens": 64, "width": 64, "depth": 4, "heads": 2}
    assert plan["data"]["items"] == 30 and plan["data"]["classes"] == 3


# the layout transformers' VideoMAE has (mean pooling, no class token, a fixed 1-D sincos table, no
# key bias), so that the run converts to it with its class names
VIDEOMAE = ["--model.class_token=false", "--model.pool=mean", "--model.pos_embed=sincos1d",
            "--model.qkv_bias=false"]


def test_a_folder_of_video_classes_end_to_end(folders, tmp_path, capsys):
    videos, run, names = folders / "videos", tmp_path / "run", sorted(MOTIONS)
    log = vitscale_ok(capsys, "train", "--model", "pico/4-f8", "--data.name=video-folder",
                      f"--data.path={videos}", "--train.batch=4", "--out", str(run), *VIDEOMAE, *QUICK)
    first = log.splitlines()[0]
    assert "at 32 px, 8 frames" in first and "2 classes" in first, first
    assert items_read(first) == len(MOTIONS) * len(VIDEO_SIZES)
    assert json.loads((run / "classes.json").read_text()) == names

    result = json.loads(vitscale_ok(capsys, "eval", str(run), "--json"))
    assert result["classes"] == names and 0 <= result["val_top1"] <= 1

    rows = json.loads(vitscale_ok(capsys, "predict", str(run), str(videos / "left" / "clip4.mp4"),
                                  str(videos / "right"), "--top-k", "2", "--json"))
    check_predictions(rows, 1 + len(VIDEO_SIZES), names, 2)

    sample = videos / "left" / "clip1.mp4"
    check_exports(capsys, run, tmp_path, names, sample, "VideoMAEForVideoClassification")

    plan = study_plan(capsys, "pico/4-f8", videos, "--train.batch=4", *VIDEOMAE)
    assert plan["base"]["frames"] == 8 and plan["base"]["tokens"] == 256 and plan["base"]["side"] == 32
    assert plan["data"]["items"] == 10 and plan["data"]["classes"] == 2


def test_a_flat_folder_of_unlabelled_images_pretrains_end_to_end(folders, tmp_path, capsys):
    flat, run = folders / "flat", tmp_path / "run"
    log = vitscale_ok(capsys, "pretrain", "--model", "pico/4", "--data.name=image-folder",
                      f"--data.path={flat}", "--train.batch=8", "--out", str(run), *QUICK)
    first = log.splitlines()[0]
    assert first.startswith("mae:") and "at 32 px" in first and "no labels" in first, first
    assert items_read(first) == len(COLORS) * len(IMAGES)
    assert json.loads((run / "classes.json").read_text()) == []

    result = json.loads(vitscale_ok(capsys, "eval", str(run), "--json"))
    assert result["classes"] == [] and math.isfinite(result["val_loss"])

    capsys.readouterr()
    assert main(["predict", str(run), str(flat / "cat-a.jpg")]) == 2  # features, no classes: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vitscale finetune --init" in err, err

    vitscale_ok(capsys, "export", str(run), "--to", "onnx")
    sidecar = json.loads((run / "model.onnx.json").read_text())
    assert sidecar["classes"] is None and sidecar["output"]["name"] == "features"
    vitscale_ok(capsys, "convert", str(run), "--to", "hf", str(tmp_path / "hf"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["ViTMAEForPreTraining"]

    plan = study_plan(capsys, "pico/4", flat, "--objective", "mae", "--train.batch=8")
    assert plan["objective"] == "mae" and plan["base"]["side"] == 32 and plan["base"]["tokens"] == 64
    assert plan["data"]["items"] == 30 and plan["data"]["classes"] == 0
