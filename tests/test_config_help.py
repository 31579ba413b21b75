"""`vitscale config COMMAND` (issue 13): every config field's help comes from the comment beside
it in the source, and the printed YAML is a --config file that reads back to the default."""

import json
from dataclasses import dataclass, fields

import pytest
import yaml

from vitscale import config
from vitscale.cli import CONFIG_COMMANDS, PLACEHOLDERS, main
from vitscale.config import DistillConfig, RunConfig, TrainConfig
from vitscale.confighelp import all_help, commented_yaml, field_help
from vitscale.data.config import DataConfig
from vitscale.models.mae import MAEConfig
from vitscale.models.vit import ViTConfig
from vitscale.study import StudyConfig

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
    assert yaml.safe_load(text) == config.to_dict(cfg)
    helps = all_help(type(cfg))
    keys = [line for line in text.splitlines() if not line.lstrip().startswith(("#", "- "))]
    assert len(keys) == len(helps) and all("  # " in line for line in keys)  # each key, its help beside it
    assert shown(capsys, command, "--config", str(path)) == text


def test_overrides_and_a_preset_are_applied_as_the_command_would(tmp_path, capsys):
    text = shown(capsys, "pretrain", "--model", "mu/4", "--train.epochs=3", "--data.frames", "1")
    (tmp_path / "c.yaml").write_text(text)
    want = config.apply_overrides(config.with_preset(config.recipe("pretrain"), "mu/4"), ["train.epochs=3"])
    assert config.load_yaml(tmp_path / "c.yaml") == want
    assert main(["config", "train", "--train.epochs=ten"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_json_gives_the_values_and_the_help(capsys):
    got = json.loads(shown(capsys, "train", "--json"))
    assert got == {"config": config.to_dict(config.recipe("train")), "help": all_help(RunConfig)}


def test_long_help_wraps_and_long_lists_go_one_item_a_line():
    text = commented_yaml(StudyConfig(), width=80)
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
