"""The task registry: one home per task, asked by the engine, evaluation, study and weights."""

import re
from pathlib import Path

import pytest

from vitscale import tasks
from vitscale.common.errors import UserError
from vitscale.train import config
from vitscale.train.config import RunConfig


def test_each_task_ranks_checkpoints_by_its_own_metric():
    result = {"val_top1": 0.5, "knn_top1": 0.25, "val_loss": 2.0}
    assert [tasks.get(t).score(result) for t in ("supervised", "finetune", "linprobe", "mae")] == [
        0.5, 0.5, 0.5, 0.25]
    assert tasks.get("mae").score({"val_loss": 2.0}) == -2.0  # no labels: the lower loss is better
    assert tasks.get("supervised").score({}) is None  # no validation data


def test_an_unknown_task_and_a_task_without_its_weights_are_refused():
    with pytest.raises(UserError, match="task must be one of supervised, mae, finetune, linprobe"):
        RunConfig(task="classify")
    for name in ("finetune", "linprobe"):
        with pytest.raises(UserError, match="needs weights"):
            RunConfig(task=name)
    assert not any(tasks.get(t).needs_init for t in ("supervised", "mae"))


def test_each_task_builds_its_module():
    cfg = config.recipe("train", model=config.preset("pico/4").replace(image_size=8, patch_size=4))
    kinds = {"supervised": tasks.Classifier, "mae": tasks.Pretrainer, "finetune": tasks.Classifier,
             "linprobe": tasks.LinearProbe}
    for name, kind in kinds.items():
        module = tasks.build(RunConfig(task=name, model=cfg.model, init="random"), 10)
        assert isinstance(module, kind), name
    with pytest.raises(UserError, match="at least 2 classes"):
        tasks.build(RunConfig(task="linprobe", model=cfg.model, init="random"), 1)
    with pytest.raises(UserError, match="tube masking is for video"):
        tasks.build(RunConfig(task="mae", model=cfg.model, mae=config.MAEConfig(masking="tube")), 0)


def test_no_module_outside_the_registry_tells_tasks_apart_by_name():
    """Adding a task must not mean finding every `task == "..."` in the code base."""
    by_name = re.compile(r"\btask\s*(==|!=|\bin\b|\bnot in\b)\s*[\"'(]")
    root = Path(tasks.__file__).parents[1]
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "tasks" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if by_name.search(line)]
    assert not found
