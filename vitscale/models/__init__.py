"""Models: the vanilla ViT for images and video."""

from vitscale.models.presets import preset, preset_names
from vitscale.models.vit import ViT, ViTConfig, param_count

__all__ = ["ViT", "ViTConfig", "param_count", "preset", "preset_names"]
