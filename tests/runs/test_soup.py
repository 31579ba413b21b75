"""Model soups: uniform and greedy averages of runs from one initialisation (vitscale.runs.soup)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vitscale.cli import main
from vitscale.common.records import apply_overrides
from vitscale.runs import soup
from vitscale.runs.evaluate import evaluate_run
from vitscale.train import engine
from vitscale.train.config import RunConfig, load_yaml

FAST = ["train.batch=32", "train.max_steps=3", "train.threads=1", "data.image_size=16", "model.patch_size=4",
        "model.depth=1", "train.warmup_epochs=0", "train.seed=0", "data.val_fraction=0.1",
        "data.test_fraction=0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs from one initialisation (no --init, train.seed 0) at different learning rates."""
    root = tmp_path_factory.mktemp("soup")
    out = []
    for name, lr in (("a", "1e-3"), ("b", "3e-3")):
        cfg = RunConfig(task="supervised", out=str(root / name))
        cfg = apply_overrides(cfg, FAST + [f"train.base_lr={lr}"])
        engine.train(cfg)
        out.append(str(root / name))
    return out


def weights(run) -> dict:
    return load_file(str(Path(run) / "best" / "model.safetensors"))


def test_a_uniform_soup_of_one_run_is_that_run(runs, tmp_path):
    result = soup.soup(runs[:1], str(tmp_path / "s"), device="cpu")
    cooked, raw = weights(tmp_path / "s"), weights(runs[0])
    assert cooked.keys() == raw.keys() and all(torch.equal(cooked[k], raw[k]) for k in raw)
    alone = evaluate_run(runs[0], device="cpu")  # what `vitscale eval RUN` says of it
    for key in ("val_top1", "val_loss", "test_top1", "test_loss"):
        assert result["uniform"][key] == result["ingredients"][0][key] == alone[key], key
    assert json.loads((tmp_path / "s" / "soup.json").read_text()) == result
    assert json.loads((tmp_path / "s" / "classes.json").read_text()) == [str(d) for d in range(10)]  # digits'


def test_a_uniform_soup_of_two_runs_is_their_mean(runs, tmp_path):
    result = soup.soup(runs, str(tmp_path / "s"), device="cpu")
    a, b = weights(runs[0]), weights(runs[1])
    cooked = weights(tmp_path / "s")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different ingredients
    for k in a:
        assert torch.equal(cooked[k], ((a[k].double() + b[k].double()) / 2).float()), k
    evaluated = evaluate_run(str(tmp_path / "s"), device="cpu")  # the soup reads as a run
    assert evaluated["val_top1"] == result["uniform"]["val_top1"]
    assert evaluated["test_top1"] == result["uniform"]["test_top1"]


def test_integer_buffers_are_the_first_ingredient_s():
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([3.0, 6.0]),
                                                                      "n": torch.tensor(9)}]
    mean = soup.average(states)
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 3


def test_greedy_admits_an_ingredient_only_if_val_does_not_fall():
    """A crafted case: ingredient 1 would lower the soup, 2 ties it, 3 raises it."""
    val = {(0,): 0.80, (0, 1): 0.75, (0, 2): 0.80, (0, 2, 3): 0.84}
    members, best, trace = soup.greedy([0, 1, 2, 3], lambda m: val[tuple(m)])
    assert members == [0, 2, 3] and best == 0.84
    assert [admitted for _, _, admitted in trace] == [True, False, True, True]


def test_the_greedy_soup_never_scores_below_its_best_ingredient_on_val(runs, tmp_path):
    result = soup.soup(runs, str(tmp_path / "g"), use_greedy=True, device="cpu")
    best = max(r["val_top1"] for r in result["ingredients"])
    g = result["greedy"]
    assert g["val_top1"] >= best and result["saved"] == "greedy"
    first = max(result["ingredients"], key=lambda r: r["val_top1"])["run"]
    assert g["members"][0] == first and g["trace"][0]["run"] == first
    running = g["trace"][0]["val_top1"]
    for step in g["trace"][1:]:  # admitted exactly when the soup with it scores no lower
        assert step["admitted"] == (step["val_top1"] >= running)
        running = step["val_top1"] if step["admitted"] else running
    assert running == g["val_top1"]


def fake_run(tmp_path, source: str, name: str, **changes) -> str:
    """A run directory whose config.yaml is `source`'s with `changes` ({"model": {"depth": 3}})."""
    cfg = yaml.safe_load((Path(source) / "config.yaml").read_text())
    for section, fields in changes.items():
        if isinstance(fields, dict):
            cfg[section] |= fields
        else:
            cfg[section] = fields
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / name)


@pytest.mark.parametrize("changes, words", [
    (dict(model={"depth": 3}), "model.depth is 3 there"),
    (dict(data={"image_size": 32}), "data.image_size"),
    (dict(model={"num_classes": 5}), "model.num_classes"),
    (dict(train={"seed": 1}), "different weights"),
    (dict(task="finetune", init="runs/pretrained"), "task is"),
])
def test_runs_of_another_model_or_initialisation_are_refused_in_one_line(runs, tmp_path, capsys, changes,
                                                                          words):
    other = fake_run(tmp_path, runs[0], "other", **changes)
    assert main(["soup", runs[0], other, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_fine_tunes_of_different_inits_are_refused(runs, tmp_path, capsys):
    a = fake_run(tmp_path, runs[0], "ft-a", task="finetune", init=str(tmp_path / "pre-a"))
    b = fake_run(tmp_path, runs[0], "ft-b", task="finetune", init=str(tmp_path / "pre-b"))
    assert main(["soup", a, b, "--out", str(tmp_path / "s")]) == 2
    assert "different weights" in capsys.readouterr().err
    same = fake_run(tmp_path, runs[0], "ft-c", task="finetune", init=str(tmp_path / "x" / ".." / "pre-a"))
    soup.check([(a, load(a)), (same, load(same))])  # one --init, spelled two ways


def test_augmentation_and_training_settings_may_differ(runs, tmp_path):
    other = fake_run(tmp_path, runs[0], "aug", train={"base_lr": 1.0, "epochs": 9},
                     data={"scale_min": 0.5, "randaugment": "rand-m9-mstd0.5-inc1"}, model={"drop_path": 0.1})
    soup.check([(runs[0], load(runs[0])), (other, load(other))])


def test_a_pretraining_run_is_no_ingredient(runs, tmp_path, capsys):
    mae = fake_run(tmp_path, runs[0], "mae", task="mae")
    assert main(["soup", mae, "--out", str(tmp_path / "s")]) == 2
    assert "ranked by knn_top1" in capsys.readouterr().err


def load(run):
    return load_yaml(Path(run) / "config.yaml")
