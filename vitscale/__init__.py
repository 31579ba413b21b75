"""vitscale: design, scale, train and benchmark vanilla Vision Transformers."""

from vitscale.models.presets import preset
from vitscale.models.vit import ViT, ViTConfig

__version__ = "0.1.0"
__all__ = ["LoadedRun", "ViT", "ViTConfig", "load_run", "preset", "__version__"]


def __getattr__(name: str):
    """`vitscale.load_run` (a trained run's model, config and class names) and its `LoadedRun`,
    imported when first asked for: `import vitscale` stays light (no data or export modules)."""
    if name in ("load_run", "LoadedRun"):
        from vitscale.runs import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'vitscale' has no attribute {name!r}")
