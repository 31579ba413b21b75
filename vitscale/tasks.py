"""What the engine trains: each task is a module whose forward(x, y) returns the loss.

  Classifier    supervised training from scratch, or full fine-tuning (cross-entropy with
                label smoothing; mixup / cutmix optional)
  Pretrainer    MAE / VideoMAE masked reconstruction
  LinearProbe   a frozen encoder's pooled features, batch-normalised, into a linear head

Every task also names the encoder it trains (`encoder`) and how to score a batch at
evaluation time (`predict`), so one engine and one evaluation serve them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale.errors import UserError
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.vit import ViT, ViTConfig


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


class LinearProbe(nn.Module):
    """Frozen encoder -> pooled feature -> BatchNorm (no affine) -> linear head (as MAE)."""

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        self.vit = ViT(cfg.replace(num_classes=0))
        self.vit.requires_grad_(False)
        self.norm = nn.BatchNorm1d(cfg.width, affine=False, eps=1e-6)
        self.head = nn.Linear(cfg.width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    @property
    def encoder(self) -> ViT:
        return self.vit

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.vit.eval()  # frozen: no drop-path, ever
        return self

    def predict(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.vit(x).float()  # [B, D] pooled (no head)
        if self.training and features.shape[0] < 2:  # batch statistics need 2 (the rest unreadable)
            return self.head(F.batch_norm(features, self.norm.running_mean, self.norm.running_var,
                                          eps=self.norm.eps))
        return self.head(self.norm(features))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.predict(x), y)


def build(task: str, cfg: ViTConfig, train, mae: MAEConfig, num_classes: int) -> nn.Module:
    """The task module for a run (`train` is the TrainConfig); a classifier needs 2 classes or more."""
    if task == "mae":
        return Pretrainer(cfg.replace(num_classes=0), mae)
    if num_classes < 2:
        raise UserError(f"{task} training needs at least 2 classes to tell apart, but the data has "
                         f"{num_classes}; use data with 2 or more classes (pretraining needs none)")
    if task == "linprobe":
        return LinearProbe(cfg, num_classes)
    return Classifier(cfg.replace(num_classes=num_classes), train.label_smoothing, train.mixup, train.cutmix)

