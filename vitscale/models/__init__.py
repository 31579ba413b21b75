"""Models: the vanilla ViT for images and video."""

from vitscale.models.vit import ViT, ViTConfig, param_count, preset, preset_names

__all__ = ["ViT", "ViTConfig", "param_count", "preset", "preset_names"]
