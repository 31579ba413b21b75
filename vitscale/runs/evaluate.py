"""`vitscale eval RUN`: a trained run's metrics, measured again from its checkpoint.

    evaluate_run("runs/pets")                      # best/ (else the newest whole checkpoint)
    evaluate_run("runs/pets", test_views="5x3")    # its test split over 5 clips x 3 crops
    evaluate_run("runs/pets", resolution=64)       # its data at another side (a multiple of the patch)
"""

from __future__ import annotations

from dataclasses import replace

from vitscale import tasks
from vitscale.common import dist
from vitscale.common.errors import UserError
from vitscale.data import build_datasets
from vitscale.tasks import evaluate
from vitscale.train.inputs import resolve, settle
from vitscale.train.rundir import RunDir


def evaluate_run(run: str, device: str = "auto", test_views: str = "", resolution: int = 0) -> dict:
    """Evaluate a finished (or running) run's best checkpoint, else its newest whole one (what
    is wrong with any passed over is named in a warning); `test_views` (e.g. "5x3") scores its
    test split over those views instead of its data.test_views; `resolution` (a side in pixels,
    a multiple of the patch size) feeds its data at that size instead (the ViT resamples its
    position embedding to it)."""
    run_dir = RunDir(run)
    cfg = settle(run_dir.config())
    if test_views:  # the weights do not depend on it
        cfg = replace(cfg, data=replace(cfg.data, test_views=test_views))
    trained = cfg.data.image_size
    if resolution:  # the model stays the trained one; only its data changes size
        if resolution % cfg.model.patch_size:
            p = cfg.model.patch_size
            raise UserError(f"--resolution {resolution} is not a multiple of the patch size {p}; "
                            f"use e.g. {p * (resolution // p + 1)}")
        cfg = replace(cfg, data=replace(cfg.data, image_size=resolution))
    d = dist.setup(device)
    try:
        train_set, val_set, test_set, info = build_datasets(cfg.data)
        if not len(val_set):
            raise UserError(f"{run!r} has no validation data to evaluate on (data.val_fraction=0); "
                             "train with data.val_fraction > 0 or a data.val_path")
        if test_views and not len(test_set):
            raise UserError(f"--test-views scores the test split, and {run!r} has none; train with "
                             "data.test_path or data.test_fraction > 0")
        if resolve(cfg, replace(info, image_size=trained)) != cfg:
            raise UserError(f"{run_dir.config_file}: its model's input or classes are not its data's; "
                             "put back the run's own config.yaml")
        task, module = tasks.get(cfg.task), tasks.build(cfg, info.num_classes)
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        found = run_dir.checkpoint(shapes)
        if found is None:
            raise UserError(f"{run!r} has no checkpoint yet")
        module.load_state_dict(found.model)
        module.to(d.device)
        ctx = evaluate.Context(cfg, train_set, val_set, info, d, picture=run_dir.path / "recon-epoch000.png")
        result = evaluate.evaluate(task, module, ctx) | evaluate.evaluate_test(task, module, ctx, test_set)
        if found.ema is not None:  # a run with train.ema: its moving average beside it
            module.load_state_dict(found.ema)
            result |= evaluate.evaluate(task, module, replace(ctx, picture=None), prefix="ema_")
            result |= evaluate.evaluate_test(task, module, ctx, test_set, prefix="ema_")
        return result
    finally:
        dist.teardown(d)
