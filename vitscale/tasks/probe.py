"""Linear probing: a frozen encoder's pooled features, batch-normalised, into a linear head
(as MAE's probe), scored as a classifier; optionally at several scales (S², Shi et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks.classify import need_classes


def scale_features(vit: ViT, x: Tensor, scale: int) -> Tensor:
    """S² feature of one scale: the image [B, C, H, W] upsampled (bicubic) to scale x its size,
    cut into scale x scale tiles of the base size, each tile through the encoder, the tiles'
    pooled features averaged -> [B, D]. (S² merges the tiles' token maps and area-pools them to
    the base map; with a pooled vector the tiles' mean stands for that merge.) Scale 1 is vit(x)."""
    if scale == 1:
        return vit(x)
    b, c, h, w = x.shape
    up = F.interpolate(x, size=(scale * h, scale * w), mode="bicubic", align_corners=False)
    tiles = up.view(b, c, scale, h, scale, w).permute(2, 4, 0, 1, 3, 5)  # [s, s, B, C, H, W]
    pooled = vit(tiles.reshape(scale * scale * b, c, h, w))  # [s*s*B, D]
    return pooled.view(scale * scale, b, -1).mean(0)


class LinearProbe(nn.Module):
    """Frozen encoder -> pooled feature (one per scale, concatenated) -> BatchNorm (no affine)
    -> linear head (as MAE)."""

    def __init__(self, cfg: ViTConfig, num_classes: int, scales: tuple[int, ...] = (1,)):
        super().__init__()
        if cfg.is_video and tuple(scales) != (1,):
            raise UserError(f"train.probe_scales={','.join(map(str, scales))} is for images; "
                            "a video model is probed at train.probe_scales=1")
        self.scales = tuple(scales)
        self.vit = ViT(cfg.replace(num_classes=0))
        self.vit.requires_grad_(False)
        width = cfg.width * len(self.scales)
        self.norm = nn.BatchNorm1d(width, affine=False, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
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
            features = torch.cat([scale_features(self.vit, x, s) for s in self.scales], -1).float()
            # [B, D * len(scales)] pooled (no head)
        if self.training and features.shape[0] < 2:  # batch statistics need 2 (the rest unreadable)
            return self.head(F.batch_norm(features, self.norm.running_mean, self.norm.running_var,
                                          eps=self.norm.eps))
        return self.head(self.norm(features))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.predict(x), y)


def build(cfg, num_classes: int) -> LinearProbe:
    """The probe of a run config (`RunConfig`) for data of `num_classes` classes."""
    need_classes(cfg.task, num_classes)
    return LinearProbe(cfg.model, num_classes, cfg.train.probe_scales)
