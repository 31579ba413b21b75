"""The training commands: config files, overrides, eval, and one-line errors."""

import json

import pytest
import yaml
from PIL import Image

from vitscale.cli import main

FAST = ["--train.batch=32", "--train.max_steps=2", "--train.threads=1", "--data.image_size=16",
        "--model.patch_size=4", "--train.warmup_epochs=0"]


def test_train_then_eval_then_reproduce_from_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--json", *FAST, "--train.base_lr", "1e-3"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["base_lr"] == 1e-3 and saved["task"] == "supervised"
    assert saved["model"]["num_classes"] == 10  # resolved from the data
    with Image.open(out / "curves.png") as im:  # the command draws the curves once the run ends
        assert im.size[0] > 500
    assert main(["eval", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["val_top1"] == pytest.approx(trained["val_top1"])
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(again), "--json"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in first]


@pytest.mark.parametrize("argv", [
    ["train", "--train.epochs=ten"],
    ["train", "--train.nope=1"],
    ["train", "--model", "Q/4"],
    ["train", "--config", "/does/not/exist.yaml"],
    ["train", "--data.name=image-folder", "--data.path=/does/not/exist"],
    ["train", "--model", "pico/4-f8"],
    ["finetune", "--init", "/does/not/exist", *FAST],
    ["eval", "/does/not/exist"],
])
def test_user_errors_are_one_line(tmp_path, capsys, argv):
    code = main([*argv, "--out", str(tmp_path / "r")] if argv[0] != "eval" else argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitscale: error:") and err.count("\n") == 1, err


def test_a_run_dir_with_another_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, *FAST]) == 0
    assert main(["train", "--out", out, *FAST, "--train.weight_decay=0.5"]) == 2
    assert "another config" in capsys.readouterr().err
