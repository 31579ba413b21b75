"""The test split: held out from train and val, reported (final.json's test_*), never selected on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitscale import tasks
from vitscale.common import checkpoint
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides
from vitscale.data import DataConfig, build_datasets
from vitscale.runs.evaluate import evaluate_run
from vitscale.study import runner
from vitscale.study.results import Sizing
from vitscale.train import engine, inputs
from vitscale.train.config import RunConfig

FAST = ["train.batch=32", "train.max_steps=3", "train.threads=1", "train.knn_k=5",
        "data.image_size=16", "model.patch_size=4", "train.warmup_epochs=0"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(val_fraction=0.5, test_fraction=0.5), "below 1"),
    (dict(test_fraction=1.0), "data.test_fraction"),
    (dict(test_fraction=-0.5), "data.test_fraction"),
    (dict(test_path="elsewhere"), "data.test_path is for real data"),
    (dict(name="cluttered-digits", test_fraction=0.1), "data.test_size"),
    (dict(name="cluttered-digits", test_size=-1), "data.test_size"),
    (dict(name="image-folder", path="x", test_path="y", test_fraction=0.1), "not both"),
])
def test_bad_test_split_settings_are_refused(kwargs, words):
    with pytest.raises(UserError, match=words):
        DataConfig(**kwargs)


def test_the_test_share_defaults_by_data():
    assert DataConfig().test_share == DataConfig(name="moving-digits").test_share == 0.1
    assert DataConfig(name="image-folder", path="x").test_share == 0.0  # real data: none unless asked
    assert DataConfig(name="image-folder", path="x", test_fraction=0.2).test_share == 0.2


def test_cluttered_digits_test_samples_are_their_own_draw_of_held_out_digits():
    cfg = dict(name="cluttered-digits", image_size=16, train_size=64, val_size=64, scale_min=1.0)
    train, val, test, _ = build_datasets(DataConfig(**cfg, test_size=48))
    assert len(test) == 48 and np.array_equal(test.sources, val.sources)  # digits training never saw
    assert not set(test.sources.tolist()) & set(train.sources.tolist())
    images = {split: split.chunk(0)[0][:48].flatten(1) for split in (val, test)}
    assert not (images[val][:, None] == images[test][None]).all(-1).any()  # no sample of val's
    again = build_datasets(DataConfig(**cfg, test_size=48))[2]
    assert torch.equal(again[7]["x"], test[7]["x"])
    assert len(build_datasets(DataConfig(**cfg, test_size=0))[2]) == 0
    assert len(build_datasets(DataConfig(**cfg, val_fraction=0.0))[2]) == 0  # no held-out digits


def write_folder(root: Path, per_class: int = 10) -> None:
    for c, colour in (("cat", 40), ("dog", 200)):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12, 12, 3), colour + i, np.uint8)).save(root / c / f"{i}.png")


def test_real_data_holds_a_test_split_only_when_asked(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", per_class=3)
    base = dict(name="image-folder", path=str(tmp_path / "train"), image_size=8, val_fraction=0.2)
    train, val, test, _ = build_datasets(DataConfig(**base))
    assert (len(train), len(val), len(test)) == (16, 4, 0)
    carved, val_too, test, _ = build_datasets(DataConfig(**base, test_fraction=0.2))
    assert (len(carved), len(test)) == (12, 4) and val_too.samples == val.samples  # val stays
    names = [{p for p, _ in s.samples} for s in (carved, val_too, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sorted(label for _, label in test.samples) == [0, 0, 1, 1]  # stratified
    _, _, given, _ = build_datasets(DataConfig(**base, test_path=str(tmp_path / "test")))
    assert len(given) == 6 and all("/test/" in p for p, _ in given.samples)


def test_final_json_reports_the_final_weights_on_test(tmp_path):
    """final.json's test_* are the final weights' top-1 on the test split, computed here by hand."""
    cfg = apply_overrides(RunConfig(task="supervised", out=str(tmp_path / "r")), FAST + ["train.ema=0.5"])
    result = engine.train(cfg).metrics
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    for key in ("test_top1", "test_top5", "test_loss", "ema_test_top1", "val_top1"):
        assert key in final and final[key] == result[key], key
    _, _, test, info = build_datasets(cfg.data)
    module = tasks.build(inputs.resolve(cfg, info), info.num_classes).eval()
    found = checkpoint.load(checkpoint.latest(Path(cfg.out)))  # the final step's weights
    for weights, key in ((found.model, "test_top1"), (found.ema, "ema_test_top1")):
        module.load_state_dict(weights)
        with torch.no_grad():
            x = torch.stack([test[i]["x"] for i in range(len(test))])
            y = torch.tensor([test[i]["y"] for i in range(len(test))])
            hits = (module.predict(x).argmax(1) == y).float().mean()
        assert final[key] == pytest.approx(float(hits), abs=1e-6), key
    evaluated = evaluate_run(cfg.out, device="cpu")  # `vitscale eval`: best/ on val and test
    assert {"val_top1", "test_top1", "ema_test_top1"} <= set(evaluated)


def test_a_pretraining_run_reports_test_knn(tmp_path):
    small = ["train.max_steps=1", "model.depth=2", "mae.decoder_width=32", "mae.decoder_depth=1",
             "mae.decoder_heads=2"]
    cfg = apply_overrides(RunConfig(task="mae", out=str(tmp_path / "p")), FAST + small)
    final = engine.train(cfg).metrics
    assert {"knn_top1", "test_knn_top1", "test_loss"} <= set(final)


def test_the_study_reports_annealed_runs_on_test_and_curves_on_val():
    run = RunConfig()
    sizing = Sizing(1.0, 10, 5, 180, {"samples_per_s": 100.0}, 1)
    final = {"val_top1": 0.9, "val_loss": 0.3, "test_top1": 0.7, "test_loss": 0.8}
    point = runner._point(1.0, 10, run, sizing, final, 100.0, True)
    assert (point.accuracy, point.loss) == (0.7, 0.8)
    row = runner._point(0.5, 5, run, sizing, final, 100.0, False)  # a mid-run val row: plots only
    assert (row.accuracy, row.loss) == (0.9, 0.3)
    no_test = runner._point(1.0, 10, run, sizing, {"val_top1": 0.9, "val_loss": 0.3}, 100.0, True)
    assert no_test.accuracy == 0.9  # data without a test split: val is all there is
