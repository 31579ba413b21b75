"""MAE / VideoMAE masked pre-training, scored by the validation reconstruction loss and the
k-NN accuracy of the encoder's pooled features; each evaluation draws reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.common.figures import plt, save_figure
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
