"""Pictures a person would rather look at (PNG, matplotlib's Agg backend, no display): training
curves here; `plt` and `save_figure` for the task that draws its own (MAE reconstructions)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Save a figure atomically."""
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def curves(rows: list[dict], path: Path) -> None:
    """Training loss by step, and validation metrics by epoch."""
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    left.set(xlabel="step", ylabel="train loss", title="training loss")
    for key in ("val_top1", "knn_top1", "val_loss"):
        pts = [(r["epoch"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=key)
    right.set(xlabel="epoch", title="validation")
    if right.get_lines():  # none without validation data
        right.legend()
    save_figure(fig, path)
