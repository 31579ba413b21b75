"""`vitscale config COMMAND` (issue 13): every config field's help comes from the comment beside
it in the source, and the printed YAML is a --config file that reads back to the default."""

import json
from dataclasses import dataclass, fields

import pytest
import yaml

from vitscale.cli import main
from vitscale.cli.commands import CONFIG_COMMANDS, PLACEHOLDERS
from vitscale.common import records
from vitscale.data.config import DataConfig
from vitscale.models.mae import MAEConfig
from vitscale.models.vit import ViTConfig
from vitscale.study.config import DEMO, StudyConfig
from vitscale.train import config
from vitscale.train.config import DistillConfig, RunConfig, TrainConfig
from vitscale.train.fieldhelp import all_help, commented_yaml, field_help

CONFIGS = (RunConfig, TrainConfig, DistillConfig, DataConfig, ViTConfig, MAEConfig, StudyConfig)


@dataclass(frozen=True)
class Example:
    plain: int = 1  # one line
    long: tuple[int, ...] = (1,
                             2)  # after a default of two lines
    # and the comment line after it
    bare: str = "x"

    # a comment after a blank line belongs to no field
    hashed: str = "# not a comment"  # the text after the value is

    def method(self) -> int:  # not a field
        return 1


def test_help_is_the_comment_beside_each_field_and_the_lines_after_it():
    assert field_help(Example) == {"plain": "one line", "hashed": "the text after the value is", "bare": "",
                                   "long": "after a default of two lines and the comment line after it"}


@dataclass(frozen=True)
class Above:
    # a block above a field
    # is its help when it has none beside it
    first: int = 1
    second: int = 2  # beside
    # and after it: second's, not third's
    third: int = 3

    # after a blank line: fourth's
    fourth: int = 4


def test_a_field_without_a_comment_beside_it_takes_the_block_above_it():
    assert field_help(Above) == {"first": "a block above a field is its help when it has none beside it",
                                 "second": "beside and after it: second's, not third's", "third": "",
                                 "fourth": "after a blank line: fourth's"}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_help(cls):
    assert {f.name for f in fields(cls)} == set(field_help(cls))
    assert [k for k, v in field_help(cls).items() if not v] == []


def test_help_walks_into_sections():
    helps = all_help(RunConfig)
    assert helps["train.epochs"] == field_help(TrainConfig)["epochs"] == "passes over the training set"
    assert {k.split(".")[0] for k in helps if "." in k} == {"model", "data", "train", "mae", "distill"}
    assert len(helps) == len(fields(RunConfig)) + sum(
        len(fields(getattr(RunConfig(), s))) for s in ("model", "data", "train", "mae", "distill"))


def default(command: str):
    """The config a command runs with when given nothing, built without the config command."""
    if command == "study":
        return StudyConfig()
    if command == "distill":
        return config.recipe(command, distill=DistillConfig(PLACEHOLDERS["teacher"]))
    return config.recipe(command, init=PLACEHOLDERS["init"] if command in ("finetune", "linprobe") else "")


def shown(capsys, *args) -> str:
    assert main(["config", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_the_printed_config_reads_back_to_the_default(tmp_path, capsys, command):
    text = shown(capsys, command)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = config.load_yaml(path, StudyConfig if command == "study" else RunConfig)
    assert cfg == default(command)
    # every key but `out`: a config file does not say where a run goes
    assert yaml.safe_load(text) == {k: v for k, v in records.to_dict(cfg).items() if k != "out"}
    helps = all_help(type(cfg))
    keys = [line for line in text.splitlines() if not line.lstrip().startswith(("#", "- "))]
    assert len(keys) == len(helps) - 1 and all("  # " in line for line in keys)  # each key, its help
    assert shown(capsys, command, "--config", str(path)) == text


def test_overrides_and_a_preset_are_applied_as_the_command_would(tmp_path, capsys):
    text = shown(capsys, "pretrain", "--model", "mu/4", "--train.epochs=3", "--data.frames", "1")
    (tmp_path / "c.yaml").write_text(text)
    want = records.apply_overrides(config.with_preset(config.recipe("pretrain"), "mu/4"),
                                  ["train.epochs=3", "data.frames=1"])
    assert config.load_yaml(tmp_path / "c.yaml") == want
    assert main(["config", "train", "--train.epochs=ten"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_json_gives_the_values_and_the_help(capsys):
    got = json.loads(shown(capsys, "train", "--json"))
    assert got == {"config": records.to_dict(config.recipe("train")), "help": all_help(RunConfig)}


def test_long_help_wraps_and_long_lists_go_one_item_a_line():
    text = commented_yaml(StudyConfig(overrides=DEMO), width=80)
    assert max(len(line) for line in text.splitlines() if "#" in line) <= 80
    assert "overrides:" in text and "  - data.name=cluttered-digits" in text


@pytest.mark.parametrize("command", ["train", "pretrain", "finetune", "distill", "study"])
def test_help_says_where_every_field_is_listed(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"vitscale config {command}" in " ".join(capsys.readouterr().out.split())


def test_without_the_source_help_is_empty_not_an_error(monkeypatch):
    @dataclass(frozen=True)
    class Shipped:
        a: int = 1  # help

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr("inspect.getsource", no_source)
    assert field_help(Shipped) == {"a": ""}
    assert commented_yaml(Shipped()) == "a: 1  #\n"


# ----------------------------------------------------------------------------- flags in --help
def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["train", "pretrain", "finetune", "distill"])
def test_every_run_config_field_is_a_flag_in_help_with_its_help_and_the_commands_default(capsys, command):
    text = help_text(capsys, command)
    values = config.recipe_values(command)
    for section in ("model", "data", "train", "mae", "distill"):
        for name, help_ in field_help(type(getattr(RunConfig(), section))).items():
            flag = f"--{section}.{name}"
            assert flag in text, flag
            first = " ".join(help_.split()[:4])
            assert first in text, (flag, first)
    for flag in ("--config", "--model", "--out", "--init", "--init-allow"):  # the top-level fields
        assert f"{flag} " in text
    # the recipe's defaults, not RunConfig's: pretrain trains 60 epochs, at betas 0.9,0.95
    epochs = values["train"]["epochs"]
    assert f"passes over the training set (default {epochs})" in text
    if command == "pretrain":
        assert "(default 0.9,0.95)" in text and "(default sincos)" in text


def test_every_study_field_is_a_flag_in_study_help(capsys):
    from vitscale.cli.flags import STUDY_FLAGS

    text = help_text(capsys, "study")
    for name in field_help(StudyConfig):
        if name != "overrides":  # the trials' --section.key=value
            assert f"--{STUDY_FLAGS.get(name, name.replace('_', '-'))} " in text, name
    for flag in ("--leaders", "--sweep-length", "--ahead", "--probe-epochs", "--decay-frac", "--warmup"):
        assert flag in text



def test_a_flag_takes_its_value_after_an_equals_sign_or_a_space(tmp_path, trained):
    assert main(["train", "--out", str(tmp_path / "a"), "--train.epochs=5", "--train.betas", "0.8,0.9",
                 "--data.mean=", "--train.resolutions", "", "--model.image_size", "16x16"]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--train.epochs", "5", "--train.epochs=6"]) == 0
    first, last_wins = trained
    assert (first.train.epochs, first.train.betas, first.model.image_size) == (5, (0.8, 0.9), (16, 16))
    assert last_wins.train.epochs == 6


@pytest.mark.parametrize(("argv", "says"), [
    (["train", "--train.epochs", "ten"], "train.epochs must be int, got 'ten'"),
    (["train", "--train.epoch=3"], "did you mean train.epochs?"),  # no abbreviation of a field
    (["train", "--train.compile=maybe"], "train.compile must be true or false"),
    (["pretrain", "--mae.mask_ratio", "nan"], "mae.mask_ratio"),
    (["study", "--leaders", "two"], "leaders must be int"),
    (["study", "--sweep-length", "2"], "sweep_length must be in (0, 1]"),
    (["study", "--ahead", "2,-1"], "ahead must be positive"),
    (["study", "--probe-epochs", "1.5"], "probe_epochs must be int"),
    (["study", "--decay-frac=1"], "decay_frac must be in (0, 1)"),
    (["study", "--warmup", "0.7"], "warmup must be in [0, 0.5)"),
    (["study", "--sweep", "0.3"], "unrecognised arguments: --sweep"),  # no abbreviation of a field
])
def test_flags_are_typed_and_checked_as_config_files_are(tmp_path, trained, capsys, argv, says):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert trained == []


def test_study_fields_from_flags_reach_the_study(tmp_path, monkeypatch):
    from vitscale.study import runner

    seen = []
    monkeypatch.setattr(runner, "run_study", lambda s, only=None: seen.append(s))
    assert main(["study", "--out", str(tmp_path / "s"), "--leaders", "1", "--sweep-length", "0.25",
                 "--ahead", "3,30", "--probe-epochs", "5", "--decay-frac", "0.3", "--warmup", "0.1",
                 "--recipe", "mr:train.resolutions=12,16", "--lrs", "", "--train.base_lr=1e-3"]) == 0
    (cfg,) = seen
    assert (cfg.leaders, cfg.sweep_length, cfg.ahead, cfg.probe_epochs, cfg.decay_frac, cfg.warmup) == (
        1, 0.25, (3.0, 30.0), 5, 0.3, 0.1)
    assert cfg.recipes == ("mr:train.resolutions=12,16",) and cfg.lrs == ()
    assert cfg.overrides[-1] == "train.base_lr=1e-3"
