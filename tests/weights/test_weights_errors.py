"""Weights a user hands vitscale, damaged or odd, end in one line that names the file
(exit 2), and `vitscale convert` never overwrites or half-writes an output (issue 10,
items 12, 13 and 15). A run's own checkpoints (resume, eval) are checked in checkpoint.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitscale import weights
from vitscale.cli import main
from vitscale.common import errors
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.presets import preset
from vitscale.weights import files

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8)


def timm_state(width=64, depth=2, grid=4, patch=8) -> dict:
    """A small timm VisionTransformer state dict (published names and shapes)."""
    g = torch.Generator().manual_seed(0)
    sd = {"cls_token": torch.randn(1, 1, width, generator=g),
          "pos_embed": torch.randn(1, 1 + grid * grid, width, generator=g),
          "patch_embed.proj.weight": torch.randn(width, 3, patch, patch, generator=g),
          "patch_embed.proj.bias": torch.zeros(width), "norm.weight": torch.ones(width),
          "norm.bias": torch.zeros(width), "head.weight": torch.randn(5, width, generator=g),
          "head.bias": torch.zeros(5)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": torch.ones(width), b + "norm1.bias": torch.zeros(width),
               b + "attn.qkv.weight": torch.randn(3 * width, width, generator=g),
               b + "attn.qkv.bias": torch.zeros(3 * width), b + "attn.proj.weight": torch.randn(width, width),
               b + "attn.proj.bias": torch.zeros(width), b + "norm2.weight": torch.ones(width),
               b + "norm2.bias": torch.zeros(width), b + "mlp.fc1.weight": torch.randn(4 * width, width),
               b + "mlp.fc1.bias": torch.zeros(4 * width),
               b + "mlp.fc2.weight": torch.randn(width, 4 * width), b + "mlp.fc2.bias": torch.zeros(width)}
    return sd


def saved(state: dict, path):
    save_file(state, str(path))
    return path


def hf_dir(path, **config):
    """A transformers ViT classifier directory; `config` overwrites fields of its config.json."""
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5))
    model.save_pretrained(path)
    if config:
        data = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(data | config))
    return path


def user_error(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one line holding every `expected` text."""
    capsys.readouterr()  # what came before (transformers' progress bars)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == errors.EXIT_USER, err
    assert err.startswith("vitscale: error:") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


def convert(src, out, *extra, to="timm") -> list[str]:
    return ["convert", str(src), "--to", to, str(out), *extra]


# ----------------------------------------------------------------------------- item 12: what a tensor holds
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused_by_key(tmp_path, capsys, dtype):
    state = {k: (v > 0 if dtype == torch.bool else v.to(dtype)) for k, v in timm_state().items()}
    src = saved(state, tmp_path / "q.safetensors")
    err = user_error(capsys, convert(src, tmp_path / "out.safetensors", "--heads", "4"),
                     str(src), "and 29 more", str(dtype).removeprefix("torch."))
    assert "floating point" in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_key_wherever_weights_are_read(tmp_path, capsys, value):
    state = timm_state(width=64, depth=4, patch=4)
    state["blocks.2.mlp.fc1.weight"][3, 1] = value
    src = saved(state, tmp_path / "diverged.safetensors")
    user_error(capsys, convert(src, tmp_path / "out.safetensors", "--heads", "2"),
               str(src), "blocks.2.mlp.fc1.weight", "NaN or infinite")
    # --init: the same line, not a non-finite loss blamed on the learning rate (exit 3)
    argv = ["finetune", "--init", str(src), "--out", str(tmp_path / "ft"), "--train.max_steps=1",
            "--train.batch=8", "--train.threads=1", "--data.image_size=16", "--model.patch_size=4"]
    user_error(capsys, argv, str(src), "blocks.2.mlp.fc1.weight", "NaN or infinite")


def test_non_float_and_non_finite_checks_name_a_few_keys_then_a_count():
    assert files.some(["a", "b"]) == "a, b"
    assert files.some([f"k{i}" for i in range(7)]) == "k0, k1, k2 and 4 more"
    good = {"w": torch.ones(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.float16)}
    assert files.checked(good, "x") is good  # every floating dtype passes, unchanged


# ----------------------------------------------------------------------------- item 13: convert's output
def test_convert_refuses_an_existing_output_and_keeps_it(tmp_path, capsys):
    src = saved(timm_state(), tmp_path / "t.safetensors")
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"precious")
    user_error(capsys, convert(src, existing, "--heads", "4"), str(existing), "exists")
    assert existing.read_bytes() == b"precious"
    user_error(capsys, convert(src, src, "--heads", "4"), "exists")  # onto its own source
    assert load_file(str(src)).keys() == timm_state().keys()
    full = tmp_path / "hf"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    user_error(capsys, convert(src, full, "--heads", "4", to="hf"), str(full), "exists")
    assert os.listdir(full) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory made for the output holds nothing to lose
    assert main(convert(src, empty, "--heads", "4", to="hf")) == 0
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("to", ["timm", "hf", "vitscale"])
def test_convert_to_a_place_it_cannot_write_is_one_line(tmp_path, capsys, to):
    src = saved(timm_state(), tmp_path / "t.safetensors")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    user_error(capsys, convert(src, blocker / "out", "--heads", "4", to=to), str(blocker / "out"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        user_error(capsys, convert(src, locked / "out", "--heads", "4", to=to), str(locked / "out"))


@pytest.mark.parametrize("to", ["timm", "hf", "vitscale"])
def test_a_write_that_fails_midway_leaves_nothing_behind(tmp_path, capsys, monkeypatch, to):
    src = saved(timm_state(), tmp_path / "t.safetensors")
    (tmp_path / "out").mkdir()

    def disk_full(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", disk_full)
    out = tmp_path / "out" / ("m.safetensors" if to == "timm" else "m")
    user_error(capsys, convert(src, out, "--heads", "4", to=to), str(out), "No space left")
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- item 15: messages that help
@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\udcff"])
def test_a_damaged_config_json_names_the_file(tmp_path, capsys, text):
    src = hf_dir(tmp_path / "hf")
    (src / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    user_error(capsys, convert(src, tmp_path / "out.safetensors"), str(src / "config.json"))


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", -5, "hidden_size"), ("num_attention_heads", 0, "num_attention_heads"),
    ("num_attention_heads", "big", "num_attention_heads"), ("num_attention_heads", 3, "divisible"),
    ("hidden_size", None, "hidden_size"), ("hidden_size", 64.5, "hidden_size"),
    ("intermediate_size", -1, "intermediate_size"), ("image_size", "x", "image_size"),
    ("patch_size", 0, "patch_size"), ("layer_norm_eps", "a", "layer_norm_eps"),
    ("qkv_bias", "yes", "qkv_bias"), ("model_type", ["vit"], "model_type"),
    ("architectures", "ViTModel", "architectures"), ("num_hidden_layers", 5, "num_hidden_layers"),
    ("hidden_size", 128, "hidden_size"), ("image_size", 64, "patches"),
])
def test_config_json_fields_are_checked_by_name(tmp_path, capsys, field, value, expected):
    src = hf_dir(tmp_path / "hf", **{field: value})
    user_error(capsys, convert(src, tmp_path / "out.safetensors"), str(src / "config.json"), expected)


def test_a_sharded_directory_with_a_damaged_index_names_it(tmp_path, capsys):
    src = hf_dir(tmp_path / "hf")
    (src / "model.safetensors").rename(src / "part-1.safetensors")
    index = src / "model.safetensors.index.json"
    for text in ["nope", "{}", json.dumps({"weight_map": {"a": "part-2.safetensors"}})]:
        index.write_text(text)
        user_error(capsys, convert(src, tmp_path / "out.safetensors"), str(src))


def test_a_damaged_vitscale_export_names_the_file(tmp_path, capsys):
    src = saved(timm_state(), tmp_path / "t.safetensors")
    assert main(convert(src, tmp_path / "vs", "--heads", "4", to="vitscale")) == 0
    capsys.readouterr()
    meta = tmp_path / "vs" / "vitscale.json"
    good = json.loads(meta.read_text())
    for data in ["{", "{}", json.dumps(good | {"model": good["model"] | {"bogus": 1}}),
                 json.dumps(good | {"model": good["model"] | {"width": "wide"}}),
                 json.dumps(good | {"model": good["model"] | {"depth": 7}})]:  # not 10**9: unchecked, built
        meta.write_text(data)
        user_error(capsys, convert(tmp_path / "vs", tmp_path / "out.safetensors"), str(meta))
    meta.write_text(json.dumps(good))
    (tmp_path / "vs" / "model.safetensors").unlink()
    user_error(capsys, convert(tmp_path / "vs", tmp_path / "out.safetensors"), "model.safetensors")


def test_a_decoder_config_that_does_not_describe_its_weights_names_the_field(tmp_path, capsys):
    mae = MAE(preset("pico/4", num_classes=0), MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2))
    weights.export(mae, tmp_path / "vs", to="vitscale")
    meta = tmp_path / "vs" / "vitscale.json"
    good = json.loads(meta.read_text())
    meta.write_text(json.dumps(good | {"mae": good["mae"] | {"decoder_depth": 7}}))  # small: a wrong check
    user_error(capsys, convert(tmp_path / "vs", tmp_path / "o.safetensors"), str(meta), "mae.decoder_depth 7")
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**SMALL, decoder_hidden_size=32,
                                           decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                           decoder_intermediate_size=128))
    for field, value in [("decoder_num_hidden_layers", 3), ("decoder_hidden_size", 64)]:
        src = tmp_path / f"hf-{field}"
        hf.save_pretrained(src)
        data = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(data | {field: value}))
        user_error(capsys, convert(src, tmp_path / "o.safetensors"), str(src / "config.json"),
                   f"{field} {value}")
    weights.export(mae, tmp_path / "mae.safetensors", to="timm")
    state = load_file(str(tmp_path / "mae.safetensors"))
    del state["decoder_embed.weight"]
    src = saved(state, tmp_path / "no-embed.safetensors")
    user_error(capsys, convert(src, tmp_path / "o.safetensors", "--heads", "2"), str(src),
               "decoder_embed.weight")


def test_odd_shapes_and_block_numbers_are_refused_by_key(tmp_path, capsys):
    for key, value in [("patch_embed.proj.weight", torch.zeros(())), ("pos_embed", torch.zeros(17, 64)),
                       ("head.weight", torch.zeros(5)), ("blocks.1.attn.qkv.weight", torch.zeros(192, 32))]:
        src = saved(timm_state() | {key: value}, tmp_path / "odd.safetensors")
        user_error(capsys, convert(src, tmp_path / "out.safetensors", "--heads", "4"), str(src), key)
    names = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "blocks.1.": "blocks.999999999."}
    far = {k: v for k, v in timm_state().items()}
    for old, new in names.items():
        far = {k.replace(old, new): v for k, v in far.items()}
    src = saved({f"vit.{k}": v for k, v in far.items()}, tmp_path / "far.safetensors")  # vitscale's own keys
    user_error(capsys, convert(src, tmp_path / "out.safetensors", "--heads", "4"), str(src), "blocks")


@pytest.mark.parametrize("case", ["missing", "empty dir", "no keys", "truncated", "pickle", "text",
                                  "misnamed", "heads 0", "image size 0", "classes -3"])
def test_unusable_weights_end_in_one_line_naming_the_file(tmp_path, capsys, case):
    good = saved(timm_state(), tmp_path / "t.safetensors")
    extra = ["--heads", "4"]
    if case == "missing":
        src = tmp_path / "nowhere.safetensors"
    elif case == "empty dir":
        src = tmp_path / "nothing"
        src.mkdir()
    elif case == "no keys":
        src = saved({}, tmp_path / "empty.safetensors")
    elif case == "truncated":
        src = tmp_path / "cut.safetensors"
        src.write_bytes(good.read_bytes()[:1000])
    elif case == "pickle":
        src = tmp_path / "model.pth"
        torch.save({"model": timm_state(), "epoch": object()}, src)
    elif case == "text":
        src = tmp_path / "notes.bin"
        src.write_text("hello")
    elif case == "misnamed":
        src = tmp_path / "model.pth"
        src.write_bytes(good.read_bytes())  # a safetensors file
    else:
        src = good
        extra = {"heads 0": ["--heads", "0"],
                 "image size 0": ["--heads", "4", "--image-size", "0"],
                 "classes -3": ["--heads", "4", "--num-classes", "-3"]}[case]
    expected = {"heads 0": "--heads", "image size 0": "--image-size", "classes -3": "--num-classes"}
    capsys.readouterr()
    code = main(convert(src, tmp_path / "out.safetensors", *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and (expected.get(case) or str(src)) in err, err
    if case == "no keys":
        assert "keys such as )" not in err and "no tensors" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_init_weights_of_another_shape_name_the_file(tmp_path, capsys):
    src = saved(timm_state(), tmp_path / "t.safetensors")  # width 64, depth 2, patch 8: not the run's model
    argv = ["finetune", "--init", str(src), "--out", str(tmp_path / "ft"), "--train.max_steps=1",
            "--train.threads=1", "--data.image_size=16", "--model.patch_size=4"]
    user_error(capsys, argv, str(src), "do not fit", "and 14 more")


def test_the_checks_do_not_change_good_weights(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in timm_state().items()}
    model, report = weights.load(saved(state, tmp_path / "bf16.safetensors"), heads=4)
    assert len(report.loaded) == len(model.state_dict())
