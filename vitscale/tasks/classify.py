"""Classification: supervised training from scratch and full fine-tuning (cross-entropy with
label smoothing; mixup / cutmix optional), scored by top-1 / top-5 on held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks import evaluate


def soft_targets(y: Tensor, classes: int, smoothing: float) -> Tensor:
    """[B] labels -> [B, classes] smoothed one-hot targets."""
    off = smoothing / classes
    targets = torch.full((y.shape[0], classes), off, device=y.device)
    return targets.scatter_(1, y[:, None], 1 - smoothing + off)


def mix(x: Tensor, targets: Tensor, mixup: float, cutmix: float) -> tuple[Tensor, Tensor]:
    """Mixup (blend two samples) or CutMix (paste a box of one into another).

    x: [B, C, H, W] or [B, C, T, H, W] (a box covers every frame); targets: [B, K].
    With both alphas set, each batch picks one at random.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if use_cutmix:
        H, W = x.shape[-2:]
        h, w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        top, left = int(torch.randint(0, H - h + 1, ())), int(torch.randint(0, W - w + 1, ()))
        x = x.clone()
        x[..., top:top + h, left:left + w] = x[perm][..., top:top + h, left:left + w]
        lam = 1 - h * w / (H * W)  # the area actually kept
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]


class Classifier(nn.Module):
    """A ViT with a head, trained with (soft) cross-entropy."""

    def __init__(self, cfg: ViTConfig, label_smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0):
        super().__init__()
        self.vit = ViT(cfg)
        self.smoothing, self.mixup, self.cutmix = label_smoothing, mixup, cutmix

    @property
    def encoder(self) -> ViT:
        return self.vit

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        targets = soft_targets(y, self.vit.cfg.num_classes, self.smoothing)
        if self.training:
            x, targets = mix(x, targets, self.mixup, self.cutmix)
        logits = self.vit(x)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def predict(self, x: Tensor) -> Tensor:
        return self.vit(x)


def need_classes(task: str, num_classes: int) -> None:
    """A classifier needs 2 classes or more to tell apart; unlabelled data (a flat folder, a list
    without labels) has none."""
    if num_classes == 0:
        raise UserError(f"{task} training needs at least 2 classes, and the data has no labels (a flat "
                         "folder, or a list without labels); put the files in one subfolder per class "
                         "(DATA/CLASS_NAME/FILE), or pre-train on them with vitscale pretrain")
    if num_classes < 2:
        raise UserError(f"{task} training needs at least 2 classes to tell apart, but the data has "
                         f"{num_classes}; use data with 2 or more classes (pretraining needs none)")


def build(cfg, num_classes: int) -> Classifier:
    """The classifier of a run config (`RunConfig`) for data of `num_classes` classes."""
    need_classes(cfg.task, num_classes)
    t = cfg.train
    return Classifier(cfg.model.replace(num_classes=num_classes), t.label_smoothing, t.mixup, t.cutmix)


def start_fine_tuning(module: nn.Module) -> list[str]:
    """After --init weights: a tiny head, and with mean pooling a fresh final norm (see
    ViT.start_fine_tuning)."""
    return module.encoder.start_fine_tuning()


def metrics(module: nn.Module, ctx: evaluate.Context) -> dict:
    """val_top1, val_top5 (with more than 5 classes; else always 1) and val_loss of module.predict;
    over ctx.views test views, of each item's mean softmax (the loss: its negative log-likelihood).
    logits: [N, K], y: [N]."""
    logits, y = evaluate.view_scores(module.predict, ctx.val_set, ctx.views, ctx.cfg, ctx.d)
    top5 = {"val_top5": evaluate.top_k(logits, y, 5)} if logits.shape[1] > 5 else {}
    return {"val_top1": evaluate.top_k(logits, y, 1), **top5, "val_loss": float(F.cross_entropy(logits, y))}
