"""Pictures a person would rather look at: MAE reconstructions and training curves (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from vitscale.data import denormalize  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Save a figure atomically."""
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _image(x: torch.Tensor, info):
    """[C, H, W] normalised -> [H, W, C] in [0, 1]."""
    return denormalize(x, info).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()


def reconstructions(pictures: dict[str, torch.Tensor], info, path: Path) -> None:
    """A grid: per sample, masked input | reconstruction | original; video as frame strips.

    pictures: name -> [B, C, H, W] or [B, C, T, H, W], in the model's normalised input space.
    """
    names = ["masked", "reconstruction", "original"]
    first = pictures[names[0]]
    B = first.shape[0]
    T = first.shape[2] if first.ndim == 5 else 1
    fig, axes = plt.subplots(B, len(names) * T, figsize=(1.2 * len(names) * T, 1.2 * B), squeeze=False)
    for b in range(B):
        for j, name in enumerate(names):
            clip = pictures[name][b]
            for t in range(T):
                ax = axes[b, j * T + t]
                ax.imshow(_image(clip[:, t] if clip.ndim == 4 else clip, info))
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and t == 0:
                    ax.set_title(name, fontsize=8, loc="left")
    save_figure(fig, path)


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
