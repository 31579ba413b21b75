"""Run configs: typed overrides, YAML round trip, clear errors."""

import pytest

from vitscale.common.records import apply_overrides, dump_yaml, from_dict
from vitscale.train.config import RunConfig, load_yaml


def test_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(RunConfig(), ["--train.epochs=5", "train.base_lr=3e-4", "--train.betas=0.9,0.95",
                                       "--train.compile=true", "--model.image_size=48x32",
                                       "--data.name=moving-digits", "--mae.mask_ratio=0.9"])
    assert cfg.train.epochs == 5 and cfg.train.base_lr == 3e-4 and cfg.train.betas == (0.9, 0.95)
    assert cfg.train.compile is True and cfg.model.image_size == (48, 32)
    assert cfg.data.name == "moving-digits" and cfg.mae.mask_ratio == 0.9
    assert apply_overrides(cfg, ["model.image_size=64"]).model.image_size == 64


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=ten", "train.epochs must be int"),
    ("train.compile=maybe", "true or false"),
    ("train.nope=1", "unknown config key"),
    ("train=1", "is a section"),
    ("train.epochs", "section.key=value"),
    ("train.betas=0.9", "2 comma-separated"),
    ("model.width=65", "not divisible by heads"),
    ("task=dance", "task must be one of"),
])
def test_bad_overrides_fail_with_one_clear_message(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(RunConfig(), [override])


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(RunConfig(), ["train.betas=0.9,0.95", "model.image_size=48x32", "out=/x"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_yaml(path) == cfg


def test_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2}")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'"):
        from_dict(RunConfig, {"train": {"epoch": 3}})


def test_finetune_needs_weights():
    with pytest.raises(ValueError, match="--init"):
        RunConfig(task="finetune")
