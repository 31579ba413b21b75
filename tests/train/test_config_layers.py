"""`--config` layers: the command decides the task and its recipe's defaults, a config file
overrides what it names, flags override both; a file for another task, or one that says where
the run goes (`out`), is refused in one line. The same for a study file."""

import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vitscale.cli import main
from vitscale.common import records
from vitscale.common.records import dump_yaml
from vitscale.study import runner
from vitscale.study.config import StudyConfig
from vitscale.train import config
from vitscale.train.config import DistillConfig, RunConfig, recipe


def write(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def one_line_error(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitscale: error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_file_with_only_data_keeps_the_commands_task_and_recipe(tmp_path, trained):
    """Reproduces issue 21: `pretrain --config my.yaml` with only a data section ran supervised."""
    path = write(tmp_path / "my.yaml", {"data": {"train_size": 500}})
    assert main(["pretrain", "--config", path, "--out", str(tmp_path / "run")]) == 0
    want = recipe("pretrain")
    assert trained == [replace(want, data=replace(want.data, train_size=500), out=str(tmp_path / "run"))]
    assert trained[0].task == "mae" and trained[0].model.pos_embed == "sincos"


def test_the_file_overrides_what_it_names_and_flags_override_both(tmp_path, trained):
    path = write(tmp_path / "my.yaml", {"train": {"epochs": 7, "weight_decay": 0.1},
                                        "model": {"depth": 3}, "mae": {"mask_ratio": 0.5}})
    assert main(["pretrain", "--config", path, "--out", str(tmp_path / "a")]) == 0
    assert main(["pretrain", "--config", path, "--out", str(tmp_path / "b"), "--train.epochs", "3",
                 "--model", "mu/4", "--mae.mask_ratio=0.6"]) == 0
    file_only, flagged = trained
    base = recipe("pretrain")
    assert (file_only.train.epochs, file_only.train.weight_decay, file_only.model.depth) == (7, 0.1, 3)
    assert file_only.train.betas == base.train.betas == (0.9, 0.95)  # the recipe's, not RunConfig's
    assert file_only.mae.mask_ratio == 0.5 and file_only.mae.decoder_width == base.mae.decoder_width
    assert (flagged.train.epochs, flagged.train.weight_decay, flagged.mae.mask_ratio) == (3, 0.1, 0.6)
    assert flagged.model == config.with_preset(base, "mu/4").model  # --model replaces the file's model


def test_init_and_teacher_from_flags_complete_a_file(tmp_path, trained):
    path = write(tmp_path / "my.yaml", {"data": {"train_size": 300}})
    assert main(["finetune", "--config", path, "--init", "random", "--out", str(tmp_path / "f")]) == 0
    assert main(["finetune", "--linear-probe", "--config", path, "--init", "random",
                 "--out", str(tmp_path / "p")]) == 0
    assert main(["distill", "--config", path, "--teacher", "T", "--out", str(tmp_path / "d")]) == 0
    finetuned, probed, distilled = trained
    assert finetuned == replace(recipe("finetune", init="random"), out=str(tmp_path / "f"),
                                data=replace(recipe("train").data, train_size=300))
    assert probed.task == "linprobe" and probed.train.base_lr == recipe("linprobe", init="x").train.base_lr
    assert distilled == replace(recipe("distill", distill=DistillConfig("T")), out=str(tmp_path / "d"),
                                data=replace(recipe("train").data, train_size=300))


@pytest.mark.parametrize(("task", "command", "says"), [
    ("mae", "train", "vitscale pretrain --config"),
    ("supervised", "pretrain", "vitscale train --config"),
    ("linprobe", "finetune", "vitscale finetune --linear-probe --config"),
    ("finetune", "distill", "vitscale finetune --config"),
])
def test_a_file_for_another_task_is_refused_naming_the_command(tmp_path, trained, capsys, task, command,
                                                               says):
    path = write(tmp_path / "config.yaml", {"task": task, "init": "random", "train": {"epochs": 2}})
    flags = {"finetune": ["--init", "random"], "distill": ["--teacher", "T"]}.get(command, [])
    one_line_error(capsys, [command, "--config", path, *flags], f"task {task}", says)
    assert trained == []


def test_a_pretrain_runs_config_yaml_given_to_train_is_refused(tmp_path, trained, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(recipe("pretrain"), leave_out=("out",)))
    (run / "metrics.jsonl").write_text("")
    one_line_error(capsys, ["train", "--config", run / "config.yaml"], "vitscale pretrain --config")
    assert main(["pretrain", "--config", str(run / "config.yaml")]) == 0  # and resumes in its directory
    assert trained == [replace(recipe("pretrain"), out=str(run))]


def test_config_shows_the_layered_result(tmp_path, capsys):
    path = write(tmp_path / "my.yaml", {"data": {"train_size": 500}, "train": {"epochs": 7}})
    assert main(["config", "pretrain", "--config", path, "--train.epochs=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    want = records.apply_overrides(recipe("pretrain"), ["data.train_size=500", "train.epochs=9"])
    assert shown == {k: v for k, v in records.to_dict(want).items() if k != "out"}


def test_what_config_prints_is_a_config_file_the_command_takes(tmp_path, capsys, trained):
    assert main(["config", "train", "--train.epochs=5"]) == 0
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert "out" not in yaml.safe_load(path.read_text())
    assert main(["train", "--config", str(path)]) == 0
    assert trained == [records.apply_overrides(recipe("train"), ["train.epochs=5"])]


# ----------------------------------------------------------------------------- fuzz item 2: out
def test_an_out_key_in_a_run_config_file_is_refused(tmp_path, trained, capsys):
    """Reproduces fuzz item 2: an `out:` key sent the run there."""
    elsewhere = tmp_path / "elsewhere"
    path = write(tmp_path / "my.yaml", {"out": str(elsewhere), "train": {"epochs": 2}})
    one_line_error(capsys, ["train", "--config", path], "does not say where a run goes", "--out DIR")
    one_line_error(capsys, ["train", "--config", path, "--out", tmp_path / "r"], "--out DIR")
    one_line_error(capsys, ["config", "train", "--config", path], "--out DIR")
    assert trained == [] and not elsewhere.exists()


def test_an_out_key_in_a_study_file_is_refused(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(runner, "run_study", lambda s, only=None: seen.append(s))
    path = write(tmp_path / "s.yaml", {"out": str(tmp_path / "elsewhere"), "seeds": 1})
    one_line_error(capsys, ["study", "--config", path], "does not say where a study goes", "--out DIR")
    assert seen == []


def test_a_runs_own_config_yaml_still_resumes_where_it_lies(tmp_path, trained):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(recipe("train"), leave_out=("out",)))
    (run / "final.json").write_text("{}")
    assert main(["train", "--config", str(run / "config.yaml")]) == 0
    assert trained == [replace(recipe("train"), out=str(run))]


# ----------------------------------------------------------------------------- study
def test_a_study_takes_its_defaults_then_the_file_then_flags(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(runner, "run_study", lambda s, only=None: seen.append(s))
    path = write(tmp_path / "s.yaml", {"seeds": 1, "factors": [1.0, 2.0], "leaders": 1})
    assert main(["study", "--config", path, "--out", str(tmp_path / "st"), "--seeds", "3",
                 "--sweep-length", "0.25"]) == 0
    assert seen == [replace(StudyConfig(), seeds=3, factors=(1.0, 2.0), leaders=1, sweep_length=0.25,
                            out=str(tmp_path / "st"))]


def test_layers_are_checked_once_at_the_end():
    """A file may name a field that only a later layer makes valid (finetune's init from --init)."""
    with pytest.raises(config.UserError, match="needs weights"):
        config.layered("finetune")
    assert config.layered("finetune", changes=["init=random"]) == recipe("finetune", init="random")
    assert isinstance(config.layered("train"), RunConfig)


# ----------------------------------------------------------------------------- shipped configs
CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_runs_with_the_commands_its_header_gives(path, tmp_path, trained, monkeypatch):
    """The configs/ files name no out and their task matches the command their header gives."""
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line.lstrip("# ")) for line in path.read_text().splitlines()
                if line.startswith("#   vitscale ") and f"configs/{path.name}" in line]
    assert commands and "out" not in yaml.safe_load(path.read_text())
    for argv in commands:
        argv = [str(path) if a == f"configs/{path.name}" else a for a in argv[1:]]
        assert main(argv) == 0, argv
    assert [cfg.out for cfg in trained] == [argv[argv.index("--out") + 1] for argv in commands]


def test_config_study_takes_the_study_flags_over_the_file(tmp_path, capsys):
    path = write(tmp_path / "s.yaml", {"seeds": 1, "leaders": 1})
    assert main(["config", "study", "--config", path, "--leaders", "3", "--ahead", "4,40",
                 "--train.base_lr=1e-3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["seeds"], shown["leaders"], shown["ahead"]) == (1, 3, [4.0, 40.0])
    assert shown["overrides"][-1] == "train.base_lr=1e-3" and "out" not in shown


def test_train_and_pretrain_take_init_too(tmp_path, trained):
    assert main(["pretrain", "--init", "random", "--init-allow", "head.*", "--out", str(tmp_path / "p")]) == 0
    assert (trained[0].task, trained[0].init, trained[0].init_allow) == ("mae", "random", "head.*")


@pytest.mark.parametrize("task", ["foo", 5, "x" * 500])
def test_a_file_naming_a_task_no_command_runs_is_one_line(tmp_path, trained, capsys, task):
    path = write(tmp_path / "my.yaml", {"task": task})
    err = one_line_error(capsys, ["train", "--config", path], "which no command runs", "leave task out")
    assert len(err) < 400 and trained == []


def test_config_shows_a_placeholder_for_weights_neither_the_file_nor_a_flag_gives(tmp_path, capsys):
    path = write(tmp_path / "my.yaml", {"data": {"train_size": 500}})
    assert main(["config", "finetune", "--config", path]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["init"] == "RUN_DIR_OR_WEIGHTS" and "needs --init" in err
    named = write(tmp_path / "named.yaml", {"init": "runs/mae", "distill": {"teacher": "runs/t"}})
    assert main(["config", "distill", "--config", named]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["distill"]["teacher"] == "runs/t" and err == ""


def test_an_older_study_yaml_naming_out_continues_where_it_lies(tmp_path, monkeypatch):
    """A study.yaml in its own study directory (one with trials/) ignores an `out` an older
    vitscale saved; anywhere else the key is refused (above)."""
    seen = []
    monkeypatch.setattr(runner, "run_study", lambda s, only=None: seen.append(s))
    home = tmp_path / "st"
    (home / "trials").mkdir(parents=True)
    path = write(home / "study.yaml", {"out": str(tmp_path / "elsewhere"), "seeds": 1})
    assert main(["study", "--config", path]) == 0
    assert [(s.out, s.seeds) for s in seen] == [(str(home), 1)]
