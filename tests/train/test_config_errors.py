"""Hostile config and CLI input ends in one line and exit 2, fast and small (issue 10, items 7, 9,
10 and 15): alias bombs and deep nesting in YAML, out-of-range fields, bad devices, empty strings,
binary files, and overrides whose order should not matter."""

import time

import pytest
import torch

from vitscale import cli
from vitscale.cli import commands
from vitscale.common import errors

MAX_SECONDS, MAX_CHARS = 3.0, 600  # a refusal is quick and its message short



def refused(capsys, argv, *fragments):
    """Run the CLI; check exit 2, one short line naming what is wrong, and that it was quick."""
    t0 = time.perf_counter()
    code = cli.main([str(a) for a in argv])
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert code == errors.EXIT_USER, err
    assert err.startswith("vitscale: error:") and err.count("\n") == 1, err[:MAX_CHARS]
    assert len(err) < MAX_CHARS and len(out) < MAX_CHARS and seconds < MAX_SECONDS, (len(err), seconds)
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------- item 9: fields and flags
@pytest.mark.parametrize(("argv", "field"), [
    (["train", "--train.batch=0"], "train.batch"),
    (["train", "--train.batch=-5"], "train.batch"),
    (["train", "--train.accum=0"], "train.accum"),
    (["train", "--train.threads=-3"], "train.threads"),
    (["train", "--train.epochs=-1"], "train.epochs"),
    (["train", "--train.epochs=0"], "train.epochs"),
    (["train", "--train.max_steps=-1"], "train.max_steps"),
    (["train", "--train.mixup=-1"], "train.mixup"),
    (["train", "--train.cutmix=-0.5"], "train.cutmix"),
    (["train", "--train.base_lr=nan"], "train.base_lr"),
    (["train", "--train.base_lr=-1e-3"], "train.base_lr"),
    (["train", "--train.betas=0.9,1.5"], "train.betas"),
    (["train", "--train.label_smoothing=1"], "train.label_smoothing"),
    (["train", "--train.dtype=fp8"], "train.dtype"),
    (["train", "--train.seed=-1"], "train.seed"),
    (["train", "--train.keep_last=-1"], "train.keep_last"),
    (["train", "--train.device=tpu"], "train.device"),
    (["train", "--train.device=cuda:x"], "train.device"),
    (["train", "--data.image_size=100000"], "data.image_size"),
    (["train", "--model.patch_size=0"], "patch"),
    (["train", "--model", ""], "--model"),
    (["train", "--out", ""], "--out"),
    (["train", "--out="], "--out"),
    (["finetune", "--init", " "], "--init"),
    (["cost", "B/0"], "patch size"),
    (["cost", "B/16", "--image-size", "0"], "image size"),
    (["cost", "B/16", "--num-classes", "-5"], "num_classes"),
    (["cost", ""], "model"),
    (["bench", "pico/4", "--batch", "-1", "--device", "cpu"], "batch"),
    (["bench", "pico/4", "--batch", "0", "--device", "cpu"], "batch"),
    (["bench", "pico/4", "--batch", "abc"], "--batch"),
    (["bench", "pico/4", "--iters", "0", "--device", "cpu"], "iters"),
    (["bench", "pico/4", "--warmup", "-1", "--device", "cpu"], "warmup"),
    (["bench", "pico/4", "--device", "tpu"], "--device"),
    (["bench", "pico/4", "--device", "cuda:99"], "cuda"),
    (["scale", "pico/4", "--factors", "nan"], "factors"),
    (["scale", "pico/4", "--factors", "inf"], "factors"),
    (["scale", "pico/4", "--factors", "1e-30"], "1e-30"),
    (["study", "--factors", "nan"], "factors"),
    (["eval", "runs/none", "--device", "tpu"], "--device"),
    (["models", "--nope"], "--nope"),
])
def test_bad_fields_and_flags_are_one_line(capsys, trained, argv, field):
    refused(capsys, argv, field)
    assert trained == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_without_a_gpu_says_use_cpu(capsys):
    refused(capsys, ["bench", "pico/4", "--device", "cuda"], "--device cpu")


# ----------------------------------------------------------------------------- item 10: override order
@pytest.mark.parametrize("order", [0, 1])
def test_overrides_are_checked_after_all_are_applied(capsys, trained, tmp_path, order):
    pair = ["--data.name=image-folder", f"--data.path={tmp_path}"]
    assert cli.main(["train", "--out", str(tmp_path / "run"), *pair[order:], *pair[:order]]) == 0
    assert trained[0].data.name == "image-folder" and trained[0].data.path == str(tmp_path)


# ----------------------------------------------------------------------------- items 7 and 15: YAML files
def _alias_bomb(levels: int) -> str:
    """9**levels values under train.betas from a few hundred bytes (a 'billion laughs')."""
    rows = ["&a0 [" + ", ".join(["0.9"] * 9) + "]"]
    rows += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "train:\n  betas: [" + ", ".join(rows) + "]\n"


YAMLS = {
    "bomb8": (_alias_bomb(8), "aliases"),
    "bomb9": (_alias_bomb(9), "aliases"),
    "deep": ("train:\n  betas: " + "[" * 20000 + "]" * 20000 + "\n", "nested"),
    "deep-block": ("".join(" " * i + "a:\n" for i in range(1100)), "nested"),
    "recursive": ("train:\n  betas: &b [0.9, *b]\n", "alias"),
    "list": ("- train\n- mae\n", "mapping"),
    "scalar": ("42\n", "mapping"),
    "unknown-key": ("train:\n  epoch: 3\n", "did you mean train.epochs?"),
    "wrong-type": ("train:\n  epochs: [1, 2]\n", "train.epochs"),
    "nested-list": ("train:\n  betas: [[0.9, 0.9], 0.95]\n", "train.betas"),
    "section-value": ("train: 5\n", "'train'"),
    "bool-as-int": ("train:\n  epochs: true\n", "train.epochs"),
    "nan": ("train:\n  base_lr: .nan\n", "train.base_lr"),
    "huge-int": ("train:\n  epochs: " + "9" * 5000 + "\n", "integer"),
    "long-key": ("train:\n  " + "k" * 1000 + ": 1\n", "train.kkk"),
    "bad-yaml": ("train: {epochs: [1, 2}\n", "not valid YAML"),
}


@pytest.mark.parametrize("command", ["train", "study"])
@pytest.mark.parametrize("name", list(YAMLS))
def test_bad_yaml_is_one_line_naming_the_file(capsys, trained, tmp_path, command, name):
    text, fragment = YAMLS[name]
    if command == "study":  # the same hostile values in a study file's fields
        text = text.replace("train:\n  betas:", "factors:").replace("train:\n  epochs:", "seeds:")
        text = text.replace("train:\n  base_lr:", "sweep_length:").replace("train:\n  epoch:", "seed:")
        fragment = {"train.betas": "factors", "train.epochs": "seeds", "train.base_lr": "sweep_length",
                    "did you mean train.epochs?": "did you mean seeds?"}.get(fragment, fragment)
        if name in ("long-key", "section-value"):
            return  # a study file has no sections
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    refused(capsys, [command, "--config", path], path.name, fragment)
    assert trained == []


@pytest.mark.parametrize(("content", "fragment"), [
    (bytes(range(256)) * 4, "not a text YAML file"),
    (b"# padding\n" * 200_000, "MB"),
])
def test_binary_or_huge_config_files_are_refused(capsys, tmp_path, content, fragment):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    refused(capsys, ["train", "--config", path], "config.yaml", fragment)


def test_a_directory_or_missing_config(capsys, tmp_path):
    refused(capsys, ["train", "--config", tmp_path], "not a file")
    refused(capsys, ["train", "--config", tmp_path / "nope.yaml"], "does not exist")


def test_an_empty_section_takes_the_defaults(tmp_path):
    from vitscale.train.config import RunConfig, load_yaml

    path = tmp_path / "config.yaml"
    path.write_text("train:\nmae:\n")
    assert load_yaml(path) == RunConfig()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 160000000256 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total\n..."),
])
def test_out_of_memory_is_the_users_to_fix(capsys, monkeypatch, error):
    def run(args):
        raise error  # as building a model or input too large for the machine does
    monkeypatch.setattr(commands, "cmd_bench", run)
    refused(capsys, ["bench", "pico/4"], "out of memory", "lower the batch")
