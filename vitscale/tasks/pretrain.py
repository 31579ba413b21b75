"""MAE / VideoMAE masked pre-training, scored by the validation reconstruction loss and the
k-NN accuracy of the encoder's pooled features; each evaluation draws reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.common.figures import figure, save_figure
from vitscale.data import denormalize
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks import evaluate


class Pretrainer(nn.Module):
    """MAE / VideoMAE: the loss is the reconstruction error on masked patches."""

    def __init__(self, cfg: ViTConfig, mae: MAEConfig):
        super().__init__()
        self.mae = MAE(cfg, mae)

    @property
    def encoder(self) -> ViT:
        return self.mae.encoder

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.mae(x)[0]

    def predict(self, x: Tensor) -> Tensor:
        """Pooled encoder features (for k-NN accuracy)."""
        return self.encoder(x)  # no head: the pooled, normalised feature


def build(cfg, num_classes: int) -> Pretrainer:
    """The MAE of a run config (`RunConfig`); labels, if any, are not used."""
    if cfg.mae.masking == "tube" and not cfg.model.is_video:
        raise UserError("tube masking is for video; use --mae.masking=random for images")
    return Pretrainer(cfg.model.replace(num_classes=0), cfg.mae)


def metrics(module: Pretrainer, ctx: evaluate.Context) -> dict:
    """val_loss (the masked reconstruction error, with the same masks every evaluation) and, with
    train.knn_k and labels, knn_top1; draws the first readable items' reconstructions."""
    # one row per sample holding its batch's mean loss: the mean over rows weights batches by size
    losses, _ = evaluate.outputs(lambda x: module(x, None).reshape(1).expand(x.shape[0]), ctx.val_set,
                                 ctx.cfg, ctx.d)
    result = {"val_loss": float(losses.mean())}
    if ctx.cfg.train.knn_k and ctx.info.num_classes > 1:
        train_f, train_y = evaluate.outputs(module.predict, ctx.train_set, ctx.cfg, ctx.d)
        val_f, val_y = evaluate.outputs(module.predict, ctx.val_set, ctx.cfg, ctx.d)
        result["knn_top1"] = evaluate.knn_top1(train_f, train_y, val_f, val_y, ctx.cfg.train.knn_k)
    if ctx.picture is not None:
        items = [it for it in map(ctx.val_set.__getitem__, range(min(32, len(ctx.val_set)))) if it][:8]
        if items:  # the first readable items
            pictures = module.mae.reconstruct(torch.stack([it["x"] for it in items]).to(ctx.d.device))
            if ctx.d.main:
                reconstructions(pictures, ctx.info, ctx.picture)
    return result


def _image(x: torch.Tensor, info):
    """[C, H, W] normalised -> [H, W, C] in [0, 1]."""
    return denormalize(x, info).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()


def reconstructions(pictures: dict[str, torch.Tensor], info, path: Path) -> None:
    """A grid: per sample, masked input | reconstruction | original; video as frame strips.

    pictures: name -> [B, C, H, W] or [B, C, T, H, W], in the model's normalised input space.
    The grid is one mosaic on one axes: an axes per picture made drawing it the slowest part of an
    evaluation (24 axes for images, 192 for an 8-frame video).
    """
    names = ["masked", "reconstruction", "original"]
    first = pictures[names[0]]
    frames = first.shape[2] if first.ndim == 5 else 1

    def framed(x: torch.Tensor, pad: int) -> np.ndarray:  # [C, H, W] -> [H, W, C] with a white margin
        return np.pad(_image(x, info), ((pad, pad), (pad, pad), (0, 0)), constant_values=1.0)

    def strip(clip: torch.Tensor) -> np.ndarray:  # a picture, or a video's frames side by side
        parts = [framed(f, 1) for f in (clip.unbind(1) if clip.ndim == 4 else [clip])]
        return np.pad(np.concatenate(parts, axis=1), ((0, 0), (3, 3), (0, 0)), constant_values=1.0)

    mosaic = np.concatenate([np.concatenate([strip(pictures[n][b]) for n in names], axis=1)
                             for b in range(first.shape[0])], axis=0)
    fig, ax = figure(figsize=(1.2 * len(names) * frames, 1.2 * first.shape[0]))
    ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    for j, name in enumerate(names):
        ax.text(j * mosaic.shape[1] / len(names) + 3, -2, name, fontsize=8, va="bottom", ha="left")
    save_figure(fig, path)
