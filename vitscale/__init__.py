"""vitscale: design, scale, train and benchmark vanilla Vision Transformers."""

from vitscale.models.vit import ViT, ViTConfig, preset

__version__ = "0.1.0"
__all__ = ["ViT", "ViTConfig", "preset", "__version__"]
