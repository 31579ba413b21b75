"""Settings belong to their data: on a user's folder a run takes its model preset's resolution and a
study its base preset's shape and the folder's size; the demo's settings stay with the demo's data;
every run's first log line says what it trains at."""

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml
from PIL import Image

from vitscale.cli import main
from vitscale.common import records
from vitscale.common.errors import UserError
from vitscale.data import DataInfo, build_datasets
from vitscale.study import preview, runner, trials
from vitscale.study.config import StudyConfig, base_run, dump_study, load_study
from vitscale.study.trials import plan
from vitscale.train import config, inputs

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three class folders of 12 RGB images of mixed sizes: 36 items."""
    root = tmp_path_factory.mktemp("own") / "photos"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (20 + 3 * i, 28, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def run_config(model: str, *overrides: str, command: str = "train"):
    """What `vitscale COMMAND --model MODEL OVERRIDES...` starts from (cli.commands._run_config's order)."""
    return records.apply_overrides(config.with_preset(config.recipe(command), model), list(overrides))


def resolved(cfg):
    """The config a run trains with, its data's info and (train, val, test) sizes: as engine.Job."""
    cfg = inputs.settle(cfg)
    train, val, test, info = build_datasets(cfg.data)
    return inputs.resolve(cfg, info), info, (len(train), len(val), len(test))


def test_a_folder_takes_the_presets_resolution(folder):
    asked = run_config("Ti/16", "data.name=image-folder", f"data.path={folder}")
    assert (asked.data.image_size, asked.data.frames) == (0, 0)  # the model's, decided before the data
    cfg, info, sizes = resolved(asked)
    m = cfg.model
    assert (cfg.data.image_size, m.hw, m.num_patches, m.heads, m.width, m.depth) == (224, (224, 224), 196, 3,
                                                                                     192, 12)
    assert cfg.data.frames == 1 and info.num_classes == 3 and sum(sizes) == 36
    assert inputs.input_note(asked, cfg) == ""  # nothing differs: nothing to say
    line = inputs.trains_at(cfg, info, sizes)
    assert line.startswith("supervised: ViT depth 12 width 192 heads 3 patch 16 at 224 px, 1 frame, "
                           "196 tokens a sample; ")
    assert f"3 classes; data image-folder: {sizes[0]} train, {sizes[1]} val, 0 test items" in line


def test_a_given_image_size_wins_and_is_said(folder):
    asked = run_config("Ti/16", "data.name=image-folder", f"data.path={folder}", "data.image_size=64")
    cfg, info, sizes = resolved(asked)
    assert (cfg.data.image_size, cfg.model.hw, cfg.model.num_patches) == (64, (64, 64), 16)
    assert inputs.input_note(asked, cfg) == ("note: the model is made for 224 px; it trains at the data's "
                                             "64 px (data.image_size=64 given)")
    assert " at 64 px, 1 frame, 16 tokens a sample" in inputs.trains_at(cfg, info, sizes)


def test_builtins_keep_their_own_size():
    plain = run_config("pico/4")  # `vitscale train`: pico/4 on digits, as before
    cfg, info, sizes = resolved(plain)
    assert (cfg.data.image_size, cfg.data.frames, cfg.model.hw) == (32, 1, (32, 32))
    assert cfg.model.num_patches == 64
    assert inputs.input_note(plain, cfg) == "" and info.num_classes == 10
    assert inputs.trains_at(cfg, info, sizes) == (
        "supervised: ViT depth 4 width 64 heads 2 patch 4 at 32 px, 1 frame, 64 tokens a sample; "
        f"10 classes; data digits: {sizes[0]:,} train, {sizes[1]:,} val, {sizes[2]:,} test items")
    big = run_config("Ti/16")  # a 224 px preset on the 32 px digits: the data's size, said
    cfg = inputs.settle(big)
    assert cfg.data.image_size == 32
    assert "digits is built-in data of 32 px" in inputs.input_note(big, inputs.resolve(cfg, info))


def test_frames_follow_a_video_model_on_video_data(folder):
    clips = inputs.settle(run_config("S/16-f16", "data.name=video-folder", f"data.path={folder}"))
    assert (clips.data.image_size, clips.data.frames) == (224, 16)
    info = DataInfo("video-folder", 5, tuple("abcde"), 3, 16, 224, (0.5,) * 3, (0.5,) * 3)
    assert " at 224 px, 16 frames, 1568 tokens a sample (tubelet 2); 5 classes; data video-folder: 40 train" \
        in inputs.trains_at(inputs.resolve(clips, info), info, (40, 10, 0))
    moving = inputs.settle(run_config("pico/4-f8", "data.name=moving-digits"))
    assert (moving.data.image_size, moving.data.frames) == (32, 8)
    assert inputs.settle(run_config("pico/4", "data.name=moving-digits")).data.frames == 1
    given = inputs.settle(run_config("pico/4-f8", "data.name=moving-digits", "data.frames=4"))
    assert given.data.frames == 4
    with pytest.raises(UserError, match="direction.*needs motion"):  # an image model gives no motion
        inputs.settle(run_config("pico/4", "data.name=moving-digits", "data.label=direction"))


@pytest.mark.slow
def test_a_runs_first_line_says_what_it_trains_at(folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mu/4", "--data.name=image-folder", f"--data.path={folder}",
            "--data.image_size=16", "--train.batch=8", "--train.max_steps=1", "--train.threads=1",
            "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("supervised: ViT depth 6 width 144 heads 3 patch 4 at 16 px, 1 frame, "
                               "16 tokens a sample; 3 classes; data image-folder: ")
    assert lines[1] == ("note: the model is made for 32 px; it trains at the data's 16 px "
                        "(data.image_size=16 given)")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["image_size"] == saved["model"]["image_size"] == 16 and saved["data"]["frames"] == 1


# ----------------------------------------------------------------------------- the study
# StudyConfig.overrides' default until the demo's settings had their own place (study.DEMO)
DEMO_BEFORE = ("data.name=cluttered-digits", "data.image_size=16", "data.scale_min=1",
               "data.train_size=16384", "train.batch=32", "model.heads=4")


def test_the_default_study_plans_exactly_the_demo():
    trials = plan(StudyConfig())
    assert [t.name for t in trials] == ["d-x0.5", "base", "d-x2", "w-x0.5", "w-x2"]
    base = next(t.run for t in trials if t.name == "base")
    assert (base.data.name, base.data.image_size, base.data.scale_min, base.data.train_size,
            base.data.val_size) == ("cluttered-digits", 16, 1.0, 16384, 2000)
    assert (base.train.batch, base.model.heads, base.model.width, base.model.hw) == (128, 4, 32, (16, 16))
    # a study.yaml written before keeps what its overrides name: the demo's settings were its
    # overrides then, and a study's own overrides come after the demo's
    before = next(t.run for t in plan(StudyConfig(overrides=DEMO_BEFORE)) if t.name == "base")
    assert (before.train.batch, before.model.heads, before.data.image_size) == (32, 4, 16)


def test_the_demos_settings_stay_with_the_demos_data():
    # the demo's data, another base: its own heads, and the data's native 32 px (Ti/16 at the demo's
    # 16 px would see one token)
    other_base = base_run(StudyConfig(model="mu/4"))
    assert (other_base.data.image_size, other_base.model.heads, other_base.train.batch) == (32, 3, 128)
    tiny = base_run(StudyConfig(model="Ti/16"))
    assert (tiny.data.image_size, tiny.model.heads) == (32, 3)
    digits = base_run(StudyConfig(overrides=("data.name=digits",)))  # another built-in
    assert (digits.data.image_size, digits.data.scale_min, digits.model.heads, digits.train.batch) == (
        32, 0.0, 2, 64)


@pytest.mark.slow
def test_a_study_on_a_folder_plans_the_presets_shape_at_the_datas_size(folder, capsys):
    argv = ["study", "--plan", "--json", "--model", "Ti/16", "--strategy", "w", "--factors", "1", "--lrs", "",
            "--budget", "epochs:4", "--data.name=image-folder", f"--data.path={folder}", "--train.batch=8"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["data"]["items"] == 36 and plan["data"]["classes"] == 3 and plan["reference_compute"] > 0
    assert {(r["side"], r["heads"], r["patch"], r["batch"]) for r in plan["trials"]} == {(224, 3, 16, 8)}
    text = "\n".join(preview.lines(plan))
    assert "base: Ti/16 at 224 px, patch 16, 196 tokens, width 192, depth 12, heads 3" in text
    assert f"data: image-folder ({folder}), 36 items: " in text and "; 3 classes" in text
    runs = trials.plan(replace(StudyConfig(model="Ti/16", strategies=("d",), factors=(1,)),
                               overrides=("data.name=image-folder", f"data.path={folder}", "train.batch=8")))
    data = runs[0].run.data  # none of the demo's settings
    assert (data.image_size, data.scale_min, data.train_size) == (224, 0.0, 100_000)


def test_a_folder_smaller_than_a_batch_is_refused_in_one_line(folder, capsys):
    argv = ["study", "--plan", "--model", "Ti/16", "--data.name=image-folder", f"--data.path={folder}"]
    assert main(argv) == 2  # a batch of 64 > the folder's training items: an epoch of no step
    err = capsys.readouterr().err
    assert "fewer than a batch of 64; lower --train.batch" in err and err.count("\n") == 1


def test_the_default_plan_shows_the_demos_base_and_data():
    plan = preview.describe(StudyConfig(strategies=("w",), factors=(1,)))
    text = "\n".join(preview.lines(plan))
    assert "base: pico/4 at 16 px, patch 4, 16 tokens, width 32, depth 4, heads 4" in text
    assert "data: cluttered-digits, 28,384 items: 16,384 train, 2,000 val, 10,000 test; 10 classes" in text


def test_a_demo_study_made_before_continues_under_the_same_command(tmp_path):
    out = tmp_path / "study"
    (out / "trials" / "base").mkdir(parents=True)
    (out / "trials" / "base" / "trial.json").write_text("{}")  # a study with work in it
    (out / "study.yaml").write_text(dump_study(StudyConfig()))
    runner._prepare(StudyConfig(out=str(out)))  # `make demo` again: the same trials, so it goes on
    assert load_study(out / "study.yaml").overrides == ()
    # the demo of an older version (batch 32, width 64) is another study now: refused in one line,
    # its study.yaml kept, rather than continued with trials of another shape
    (out / "study.yaml").write_text(dump_study(StudyConfig(overrides=DEMO_BEFORE)))
    with pytest.raises(UserError, match="another config"):
        runner._prepare(StudyConfig(out=str(out)))
    assert load_study(out / "study.yaml").overrides == DEMO_BEFORE
    with pytest.raises(UserError, match="another config"):  # what changes a trial is still refused
        runner._prepare(StudyConfig(overrides=("train.batch=16",), out=str(out)))
