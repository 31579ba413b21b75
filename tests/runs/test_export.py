"""`vitscale export RUN --to onnx`: the graph onnxruntime runs gives the PyTorch model's outputs."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitscale import tasks, weights
from vitscale.cli import main
from vitscale.common.records import apply_overrides
from vitscale.runs import export as vexport
from vitscale.train import engine
from vitscale.train.config import DistillConfig, RunConfig, load_yaml

# One block (two where tokens are dropped after the first): the exporter traces and optimises every
# block alike, so more blocks only cost export time.
FAST = ["train.batch=32", "train.max_steps=2", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "model.depth=1", "train.warmup_epochs=0"]
DROP = ["model.depth=2", "model.keep=0.5", "model.drop_after=1"]
VIDEO = ["data.name=moving-digits", "data.frames=4", "data.num_clips=64", "data.label=direction",
         "model.frames=4", "model.tubelet=2"]
MAE = ["mae.decoder_width=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]


def trained(tmp_path, name, *overrides, task="supervised", init="", **fields):
    cfg = RunConfig(task=task, init=init, out=str(tmp_path / name), **fields)
    cfg = apply_overrides(cfg, FAST + list(overrides))
    engine.train(cfg)
    return cfg.out


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """`shared(name, *overrides)`: a run trained once for the tests that export the same model; read
    it, or export into a copy of it (`copied`)."""
    runs = {}

    def get(name, *overrides):
        if name not in runs:
            runs[name] = trained(tmp_path_factory.mktemp("shared"), name, *overrides)
        return runs[name]

    return get


def copied(run, tmp_path):
    """A copy of a shared run in this test's folder, for a test that writes into its run."""
    return str(shutil.copytree(run, tmp_path / Path(run).name))


def task_module(run):
    """The run's task module loaded from best/ by hand: the PyTorch reference."""
    cfg, state = load_yaml(f"{run}/config.yaml"), load_file(f"{run}/best/model.safetensors")
    head = state.get("vit.head.weight", state.get("head.weight"))
    module = tasks.build(cfg, 0 if head is None else head.shape[0])
    module.load_state_dict(state)
    return module.eval()


def onnxruntime_vs(reference, path, shape, batches=(1, 3)):
    """Max |onnxruntime - reference| over standard-normal inputs at each batch, printed."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = {}
    for b in batches:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            want = reference(x)
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        assert got.shape == want.shape
        diffs[b] = float((got - want).abs().max())
    print(f"{path}: max abs difference onnxruntime vs PyTorch {diffs}")
    return diffs


def export(run, *args):
    assert main(["export", run, "--to", "onnx", *args]) == 0


@pytest.mark.slow
def test_image_classifier_exports_with_a_dynamic_batch(tmp_path, capsys, shared):
    pytest.importorskip("onnxscript")
    run = copied(shared("sup"), tmp_path)
    export(run)
    assert "max abs difference" in capsys.readouterr().out
    model, _ = weights.load(run)  # the run's ViT by the weights reader, not the exporter's loader
    diffs = onnxruntime_vs(model.eval(), f"{run}/model.onnx", (3, 16, 16))
    assert max(diffs.values()) < 1e-4
    meta = json.loads(Path(run, "model.onnx.json").read_text())
    assert meta["input"]["shape"] == ["batch", 3, 16, 16] and meta["output"] == {"name": "logits",
                                                                                 "shape": ["batch", 10]}
    assert meta["input"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["classes"] == [str(d) for d in range(10)]  # digits' names, from the run's classes.json
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):  # the exporter's own check can fail
        cfg = load_yaml(f"{run}/config.yaml")
        vexport.check(Path(run, "model.onnx"), lambda x: model(x) + 1e-3, cfg, (1,))
    assert main(["export", run, "--to", "onnx"]) == 2  # never overwritten
    assert "model.onnx exists" in capsys.readouterr().err
    assert main(["export", run, "--to", "onnx", "--ema", "--out", str(tmp_path / "ema.onnx")]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err


@pytest.mark.slow
def test_ema_exports_the_moving_average(tmp_path):
    pytest.importorskip("onnxscript")
    run = trained(tmp_path, "ema", "train.ema=0.5")
    export(run, "--ema")
    model, raw = task_module(run), task_module(run)
    model.load_state_dict(load_file(f"{run}/best/ema.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model.predict(x) - raw.predict(x)).abs().max() > 1e-3  # the average is not the raw weights
    diffs = onnxruntime_vs(model.predict, f"{run}/model.onnx", (3, 16, 16))
    assert max(diffs.values()) < 1e-4
    assert json.loads(Path(run, "model.onnx.json").read_text())["ema"] is True


@pytest.mark.slow
def test_video_classifier_exports_with_a_dynamic_batch(tmp_path, shared):
    pytest.importorskip("onnxscript")
    run = copied(shared("vid", *VIDEO), tmp_path)
    export(run)
    diffs = onnxruntime_vs(task_module(run).predict, f"{run}/model.onnx", (3, 4, 16, 16))
    assert max(diffs.values()) < 1e-4
    meta = json.loads(Path(run, "model.onnx.json").read_text())
    assert meta["classes"] == ["E", "NE", "N", "NW", "W", "SW", "S", "SE"]  # data.label=direction


@pytest.mark.slow
def test_a_fixed_batch_with_the_weights_apart_of_a_run_without_class_names(tmp_path, monkeypatch, capsys,
                                                                           shared):
    pytest.importorskip("onnxscript")
    run = copied(shared("vid", *VIDEO), tmp_path)
    Path(run, "classes.json").unlink()  # as a run trained before vitscale saved class names
    monkeypatch.setattr(vexport, "LARGE", 0)  # as a model too large for one protobuf: weights apart
    export(run, "--batch", "2", "--out", str(tmp_path / "b2.onnx"))
    assert "has no classes.json" in capsys.readouterr().err
    assert json.loads((tmp_path / "b2.onnx.json").read_text())["classes"] == [str(i) for i in range(8)]
    assert (tmp_path / "b2.onnx.data").is_file()
    diffs = onnxruntime_vs(task_module(run).predict, tmp_path / "b2.onnx", (3, 4, 16, 16), batches=(2,))
    assert max(diffs.values()) < 1e-4
    assert json.loads((tmp_path / "b2.onnx.json").read_text())["input"]["shape"] == [2, 3, 4, 16, 16]


@pytest.mark.slow
@pytest.mark.parametrize("task, overrides, shape", [
    ("supervised", DROP, (3, 16, 16)),  # EViT: top-k of cls attention
    ("supervised", [*VIDEO, *DROP, "model.drop_by=keyframe"],
     (3, 4, 16, 16)),  # EVAD: the middle frame's tokens, then top-k
    ("linprobe", ["train.probe_scales=1,2"], (3, 16, 16)),  # S²: a bicubic upsampling and tiles
])
def test_token_dropping_and_multi_scale_probes_export(tmp_path, task, overrides, shape):
    pytest.importorskip("onnxscript")
    run = trained(tmp_path, "run", *overrides, task=task, init="random" if task == "linprobe" else "")
    export(run)
    diffs = onnxruntime_vs(task_module(run).predict, f"{run}/model.onnx", shape)
    assert max(diffs.values()) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("task, overrides, output, width", [
    ("mae", MAE, "features", 64),  # the encoder's pooled, normalised features
    ("linprobe", [], "logits", 10),  # batch-normalised features into the probe's head
    ("finetune", [], "logits", 10),
])
def test_mae_exports_its_encoder_features_and_a_linear_probe_its_logits(tmp_path, task, overrides, output,
                                                                       width):
    pytest.importorskip("onnxscript")
    run = trained(tmp_path, task, *overrides, task=task, init="random" if task != "mae" else "")
    export(run)
    meta = json.loads(Path(run, "model.onnx.json").read_text())
    assert meta["task"] == task and meta["output"] == {"name": output, "shape": ["batch", width]}
    assert meta["classes"] == (None if task == "mae" else [str(d) for d in range(10)])
    diffs = onnxruntime_vs(task_module(run).predict, f"{run}/model.onnx", (3, 16, 16))
    assert max(diffs.values()) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind, output", [("soft", "logits"), ("feature", "features")])
def test_a_distilled_student_exports_without_its_teacher(tmp_path, kind, output, shared):
    pytest.importorskip("onnxscript")
    teacher = shared("sup")  # read only
    run = trained(tmp_path, "student", task="distill", distill=DistillConfig(teacher=teacher, kind=kind))
    export(run)
    assert json.loads(Path(run, "model.onnx.json").read_text())["output"]["name"] == output
    diffs = onnxruntime_vs(task_module(run).predict, f"{run}/model.onnx", (3, 16, 16))
    assert max(diffs.values()) < 1e-4


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    assert main(["export", str(tmp_path), "--to", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'vitscale[onnx]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--to", "onnx"], "is not a run directory"),
    (["--to", "onnx", "--batch", "0"], "--batch must be 'dynamic' or a positive whole number"),
    (["--to", "tflite"], "invalid choice"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    assert main(["export", str(tmp_path / "nothing"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_without_a_checkpoint_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "new"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({"task": "supervised"}))
    assert main(["export", str(run), "--to", "onnx"]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err
