"""Linear probing: a frozen encoder's pooled features, batch-normalised, into a linear head
(as MAE's probe), scored as a classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks.classify import need_classes


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


def build(cfg, num_classes: int) -> LinearProbe:
    """The probe of a run config (`RunConfig`) for data of `num_classes` classes."""
    need_classes(cfg.task, num_classes)
    return LinearProbe(cfg.model, num_classes)
