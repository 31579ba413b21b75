"""Model presets decoded from names, as big_vision's: ``"B/16"`` -> width, depth, heads, MLP.

``preset("S/16-f16")`` is ViT-S/16 on 16-frame clips with VideoMAE's tubelet of 2; keyword
overrides replace any field afterwards. `vitscale models` lists `preset_names()`.
"""

from __future__ import annotations

from vitscale.common.errors import UserError
from vitscale.models.vit import ViTConfig

# name -> (width, depth, heads, mlp_ratio). Standard sizes as in ViT / big_vision; "pico"
# and "mu" are small enough to train on two CPU cores in minutes.
SIZES: dict[str, tuple[int, int, int, float]] = {
    "pico": (64, 4, 2, 4.0),
    "mu": (144, 6, 3, 4.0),
    "Ti": (192, 12, 3, 4.0),
    "S": (384, 12, 6, 4.0),
    "M": (512, 12, 8, 4.0),
    "B": (768, 12, 12, 4.0),
    "L": (1024, 24, 16, 4.0),
    "H": (1280, 32, 16, 4.0),
}
# Sizes meant for small inputs (built-in digits, 32 px, 10 classes) rather than ImageNet.
SMALL = {"pico": (32, 10), "mu": (32, 10)}
VIDEO_TUBELET = 2  # VideoMAE's temporal patch


def preset(name: str, **overrides) -> ViTConfig:
    """Decode a preset name into a config.

    Grammar: ``SIZE/PATCH[-fFRAMES[tTUBELET]]``, e.g. ``B/16`` (ViT-B/16, 224 px),
    ``S/16-f16`` (16 frames, tubelet 2, as VideoMAE), ``pico/4-f8t1``. Keyword overrides
    replace any field afterwards (``preset("B/16", image_size=384)``).
    """
    size, _, rest = name.partition("/")
    patch_str, _, video = rest.partition("-")
    if size not in SIZES or not patch_str.isdigit():
        raise UserError(
            f"unknown preset {name!r}; use SIZE/PATCH with SIZE one of {', '.join(SIZES)} "
            "(e.g. B/16, S/16-f16); `vitscale models` lists them"
        )
    width, depth, heads, mlp_ratio = SIZES[size]
    image_size, num_classes = SMALL.get(size, (224, 1000))
    frames, tubelet = 1, 1
    if video:
        f_str, _, t_str = video.lstrip("f").partition("t")
        if not video.startswith("f") or not f_str.isdigit() or (t_str and not t_str.isdigit()):
            raise UserError(f"bad video suffix in preset {name!r}; write -fFRAMES[tTUBELET], e.g. -f16")
        frames, tubelet = int(f_str), int(t_str) if t_str else VIDEO_TUBELET
    fields = dict(
        image_size=image_size, patch_size=int(patch_str), frames=frames, tubelet=tubelet,
        width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
    )
    fields.update(overrides)
    return ViTConfig(**fields)


def preset_names() -> list[str]:
    """The presets listed by `vitscale models`."""
    image = ["pico/4", "mu/4", "Ti/16", "S/16", "M/16", "B/16", "B/32", "L/16", "H/14"]
    video = ["pico/4-f8", "S/16-f16", "B/16-f16", "L/16-f16"]
    return image + video
