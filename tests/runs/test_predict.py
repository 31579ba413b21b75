"""Class names and prediction: every run saves its class names (classes.json), HF export, the
ONNX sidecar and eval carry them, `vitscale predict` classifies files through the run's own
evaluation transforms, `vitscale.load_run` gives a notebook the same model, and a flat folder
pre-trains (MAE) while supervised training on it is refused in one line."""

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitscale
from vitscale import weights
from vitscale.cli import main
from vitscale.common import classnames
from vitscale.data import build_datasets
from vitscale.models.vit import ViT
from vitscale.train.config import load_yaml

FAST = ["--train.batch=4", "--train.max_steps=3", "--train.threads=1", "--data.image_size=16",
        "--model.patch_size=4", "--train.warmup_epochs=0", "--model", "pico/4"]
CLASSES = ("cat", "dog", "owl")  # subfolder names, in label order
MAE = ["--mae.decoder_width=32", "--mae.decoder_depth=1", "--mae.decoder_heads=2"]
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}


def one_line(code: int, err: str, *words: str) -> bool:
    return code == 2 and err.startswith("vitscale: error:") and err.count("\n") == 1 and all(
        w in err for w in words)


def image_folder(root: Path, per_class: int = 6) -> Path:
    """Class subfolders of small PNGs and JPEGs of mixed sizes, each class its own colour."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = 18 + 2 * i, 24 - i
            pixels = (rng.random((h, w, 3)) * 50 + COLOURS[c]).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def video(path: Path, colour: tuple[int, int, int], frames: int = 8) -> None:
    """An mp4 of `frames` 16 x 16 frames of one colour, brightening."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for t in range(frames):
            frame = np.full((16, 16, 3), colour, np.uint8) // 2 + 12 * t
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    path.write_bytes(out.getvalue())


def train(capsys, *args) -> None:
    code = main([*args, *FAST])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A supervised pico/4 run on a class folder (3 classes), 3 steps."""
    tmp = tmp_path_factory.mktemp("folder")
    data = image_folder(tmp / "data")
    assert main(["train", "--out", str(tmp / "run"), *FAST, "--data.name=image-folder",
                 f"--data.path={data}", "--data.val_fraction=0.34"]) == 0
    return tmp / "run"


def model_of(run: Path) -> ViT:
    """The run's ViT from best/model.safetensors, built by hand from its config.yaml."""
    cfg = load_yaml(run / "config.yaml")
    model = ViT(cfg.model)
    state = load_file(run / "best" / "model.safetensors")
    model.load_state_dict({k[len("vit."):]: v for k, v in state.items()})
    return model.eval()


def predicted(capsys, run: Path, *paths, k: int = 3) -> list[dict]:
    assert main(["predict", str(run), *map(str, paths), "--top-k", str(k), "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- classes.json
@pytest.mark.slow
def test_a_folder_run_saves_its_class_names_in_label_order(folder_run):
    assert json.loads((folder_run / "classes.json").read_text()) == list(CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("data, names", [
    (["--data.name=digits"], [str(d) for d in range(10)]),
    (["--data.name=moving-digits", "--data.frames=4", "--data.num_clips=64", "--data.label=direction",
      "--model.frames=4", "--model.tubelet=2"], ["E", "NE", "N", "NW", "W", "SW", "S", "SE"]),
])
def test_a_builtin_run_saves_its_class_names(tmp_path, capsys, data, names):
    train(capsys, "train", "--out", str(tmp_path / "run"), *data, "--train.max_steps=1")
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == names


def test_a_damaged_classes_file_is_one_line(tmp_path):
    (tmp_path / "classes.json").write_text('["a", "b"]')
    with pytest.raises(vitscale.common.errors.UserError, match="names 2 classes, the model has 3 outputs"):
        classnames.read(tmp_path, 3)
    assert classnames.read(tmp_path / "old", 3) == (("0", "1", "2"), False)  # an old run: by id


# ----------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_predict_gives_the_run_s_classes_and_the_softmax_of_its_eval_data(folder_run, capsys):
    cfg = load_yaml(folder_run / "config.yaml")
    _, val, _, _ = build_datasets(cfg.data)  # the run's own validation items: its eval transform
    files = [path for path, _ in val.samples]
    records = predicted(capsys, folder_run, *files, k=3)
    assert [r["file"] for r in records] == files
    model = model_of(folder_run)
    with torch.no_grad():
        want = model(torch.stack([val[i]["x"] for i in range(len(val))])).softmax(-1)  # [N, 3]
    for r, p in zip(records, want, strict=True):
        assert {t["class"] for t in r["top"]} == set(CLASSES)
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1, abs=1e-6)
        for t in r["top"]:
            assert t["class"] == CLASSES[t["id"]] and t["probability"] == pytest.approx(float(p[t["id"]]),
                                                                                        abs=1e-6)
        shown = [t["probability"] for t in r["top"]]
        assert shown == sorted(shown, reverse=True)


@pytest.mark.slow
def test_predict_scans_a_folder_names_an_unreadable_file_and_prints_top_k_lines(folder_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for name, c in (("a.png", "cat"), ("more/b.jpg", "owl")):
        Image.new("RGB", (30, 20), COLOURS[c]).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (photos / "notes.txt").write_text("not an image")
    video(photos / "clip.mp4", COLOURS["dog"])  # an image model takes a video's middle frame
    assert main(["predict", str(folder_run), str(photos), "--top-k", "2", "--batch", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    names = ("a.png", "clip.mp4", "more/b.jpg")
    assert [line.split(":")[0] for line in lines] == [str(photos / n) for n in names]
    assert all(len(line.split(": ")[1].split(", ")) == 2 for line in lines)  # top 2
    assert all(line.split(": ")[1].split(" ")[0] in CLASSES for line in lines)
    assert err.count("\n") == 1 and "skipped" in err and str(photos / "broken.jpg") in err


@pytest.mark.slow
def test_load_run_is_what_predict_uses(folder_run, capsys):
    run = vitscale.load_run(folder_run)
    assert run.classes == CLASSES and run.named and run.logits and not run.model.training
    assert run.checkpoint.resolve() == (folder_run / "best").resolve()
    image = next(iter(sorted((folder_run.parent / "data" / "dog").iterdir())))
    with torch.no_grad():
        probs = run.model(run.preprocess(image)[None]).softmax(-1)[0]
    (record,) = predicted(capsys, folder_run, image, k=3)
    assert {t["class"]: t["probability"] for t in record["top"]} == pytest.approx(
        {name: float(p) for name, p in zip(CLASSES, probs, strict=True)}, abs=1e-6)
    with torch.no_grad():  # the model is the run's, weights and all
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(run.model(x), model_of(folder_run)(x))


# What a one-process training run need not import before it steps (then torch._dynamo, which the
# optimizer's step imports, brings FSDP): FSDP and DCP only where a run shards, matplotlib only to draw.
HEAVY = ("torch.distributed.fsdp", "torch.distributed.checkpoint", "matplotlib", "matplotlib.pyplot")


@pytest.mark.slow
def test_importing_vitscale_stays_light():
    """`import vitscale` holds back the run-time modules; the CLI and the training engine hold
    back HEAVY (one fresh process for both: the first checks come before the second import)."""
    code = ("import sys, vitscale; assert 'vitscale.runs.predict' not in sys.modules; "
            "assert 'vitscale.data' not in sys.modules; assert callable(vitscale.load_run); "
            "import vitscale.cli, vitscale.train.engine; "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_an_old_run_without_class_names_predicts_by_id_and_says_so(folder_run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folder_run, old)
    (old / "classes.json").unlink()
    image = next(iter(sorted((folder_run.parent / "data" / "owl").iterdir())))
    assert main(["predict", str(old), str(image), "--top-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert {n.split(" ")[0] for n in out.split(": ")[1].strip().split(", ")} == {"0", "1", "2"}
    assert "has no classes.json" in err and err.count("\n") == 1


@pytest.mark.slow
def test_an_mae_run_is_refused_in_one_line(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=3)
    train(capsys, "pretrain", "--out", str(tmp_path / "mae"), "--data.name=image-folder",
          f"--data.path={data}", *MAE)
    code = main(["predict", str(tmp_path / "mae"), str(data)])
    assert one_line(code, capsys.readouterr().err, "mae run", "no classifier", "vitscale finetune")


@pytest.mark.parametrize("args, words", [
    (["--top-k", "0"], ["--top-k", "1 or more"]),
    (["--batch", "-1"], ["--batch", "1 or more"]),
    (["--device", "tpu"], ["--device"]),
    (["--ema"], ["not a run directory"]),
    ([], ["not a run directory"]),
])
def test_bad_predict_input_is_one_line(tmp_path, capsys, args, words):
    code = main(["predict", str(tmp_path / "nothing"), "x.jpg", *args])
    assert one_line(code, capsys.readouterr().err, *words)


@pytest.mark.slow
def test_predict_on_a_video_run(tmp_path, capsys):
    data = tmp_path / "clips"
    for c in ("red", "blue"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            video(data / c / f"{i}.mp4", (220, 30, 30) if c == "red" else (30, 30, 220), frames=8 + i)
    run = tmp_path / "run"
    train(capsys, "train", "--out", str(run), "--data.name=video-folder", f"--data.path={data}",
          "--data.frames=4", "--model.frames=4", "--model.tubelet=2", "--data.val_fraction=0.5")
    assert json.loads((run / "classes.json").read_text()) == ["blue", "red"]
    cfg = load_yaml(run / "config.yaml")
    _, val, _, _ = build_datasets(cfg.data)
    files = [path for path, _ in val.samples]
    picture = tmp_path / "still.png"
    Image.new("RGB", (16, 16)).save(picture)
    assert main(["predict", str(run), *files, str(picture), "--json", "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["file"] for r in records] == files  # the still image is no clip: named and skipped
    assert str(picture) in err and "clips of 4 frames" in err and err.count("\n") == 1
    with pytest.raises(vitscale.common.errors.UserError, match="give it a video"):
        vitscale.load_run(run).preprocess(picture)
    assert vitscale.load_run(run).preprocess(files[0]).shape == (3, 4, 16, 16)  # [C, T, H, W]
    with torch.no_grad():
        want = model_of(run)(torch.stack([val[i]["x"] for i in range(len(val))])).softmax(-1)
    for r, p in zip(records, want, strict=True):
        assert {t["class"]: t["probability"] for t in r["top"]} == pytest.approx(
            {"blue": float(p[0]), "red": float(p[1])}, abs=1e-6)


# ----------------------------------------------------------------------------- eval, HF
@pytest.mark.slow
def test_eval_names_the_classes(folder_run, capsys):
    assert main(["eval", str(folder_run), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == list(CLASSES)
    assert main(["eval", str(folder_run), "--device", "cpu"]) == 0
    assert "classes (3): cat, dog, owl" in capsys.readouterr().out


@pytest.mark.slow
def test_hf_export_writes_id2label_that_transformers_reads(folder_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    assert main(["convert", str(folder_run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == dict(enumerate(CLASSES))
    assert hf.config.label2id == {c: i for i, c in enumerate(CLASSES)}
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "again"), "--to", "hf"]) == 0  # kept
    assert json.loads((tmp_path / "again" / "config.json").read_text())["id2label"] == {
        str(i): c for i, c in enumerate(CLASSES)}
    assert main(["convert", str(folder_run), str(tmp_path / "new"), "--to", "hf", "--num-classes", "5"]) == 0
    assert json.loads((tmp_path / "new" / "config.json").read_text())["id2label"]["4"] == "LABEL_4"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "vs"), "--to", "vitscale"]) == 0
    assert json.loads((tmp_path / "vs" / "vitscale.json").read_text())["classes"] == list(CLASSES)
    assert weights.read(tmp_path / "vs").labels == CLASSES  # and back
    capsys.readouterr()


# ----------------------------------------------------------------------------- flat folders
@pytest.mark.slow
def test_a_flat_folder_pretrains_and_a_classifier_on_it_is_one_line(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(10):
        Image.new("RGB", (20 + i, 18), (25 * i, 100, 200 - 10 * i)).save(flat / f"{i}.png")
    train(capsys, "pretrain", "--out", str(tmp_path / "mae"), "--data.name=image-folder",
          f"--data.path={flat}", *MAE)
    assert json.loads((tmp_path / "mae" / "final.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "mae" / "classes.json").read_text()) == []
    code = main(["train", "--out", str(tmp_path / "sup"), *FAST, "--data.name=image-folder",
                 f"--data.path={flat}"])
    assert one_line(code, capsys.readouterr().err, "no labels", "subfolder per class", "vitscale pretrain")
    assert not (tmp_path / "sup").exists()  # refused before the run directory is made


def test_a_flat_folder_is_unlabelled_data(tmp_path):
    from vitscale.data.folders import IMAGE_EXTS, scan_folder

    for name in ("b.png", "a.jpg", ".hidden.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    samples, classes = scan_folder(str(tmp_path), IMAGE_EXTS)
    assert classes == () and samples == [(str(tmp_path / "a.jpg"), 0), (str(tmp_path / "b.png"), 0)]
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "c.png")
    with pytest.warns(UserWarning, match="2 image file.* in no class subfolder"):  # class folders win
        samples, classes = scan_folder(str(tmp_path), IMAGE_EXTS)
    assert classes == ("cat",) and samples == [(str(tmp_path / "cat" / "c.png"), 0)]


def test_a_flat_folder_of_videos_is_unlabelled_data(tmp_path):
    from vitscale.data.folders import VIDEO_EXTS, scan_folder

    for name in ("b.mp4", "a.mkv"):
        (tmp_path / name).write_bytes(b"")  # scanning goes by the name; reading is the reader's
    samples, classes = scan_folder(str(tmp_path), VIDEO_EXTS, what="video")
    assert classes == () and [f for f, _ in samples] == [str(tmp_path / "a.mkv"), str(tmp_path / "b.mp4")]
    assert scan_folder(str(tmp_path), VIDEO_EXTS, classes=(), what="video")[1] == ()  # a flat val folder
    with pytest.raises(vitscale.common.errors.UserError, match="no class subfolders"):  # training had classes
        scan_folder(str(tmp_path), VIDEO_EXTS, classes=("cat", "dog"), what="video")


def test_a_folder_without_images_or_videos_is_one_line(tmp_path):
    from vitscale.runs.predict import files_of

    (tmp_path / "notes.txt").write_text("no picture")
    with pytest.raises(vitscale.common.errors.UserError, match="holds no image or video files"):
        files_of([tmp_path])
    assert files_of([tmp_path / "notes.txt"]) == [str(tmp_path / "notes.txt")]  # a file named is tried
