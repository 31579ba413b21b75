"""What a run trains at: the data's input shape decided from the model's before the data is built
(`settle`), then the model made to the data's shape and classes (`resolve`), and the lines that
say so in the log (`trains_at`, `input_note`). Runs, a study's plan and its trials decide it
here alike.
"""

from __future__ import annotations

from dataclasses import replace

from vitscale.common.errors import UserError
from vitscale.data import DataInfo
from vitscale.train.config import RunConfig


def settle(cfg: RunConfig) -> RunConfig:
    """Decide the data's input shape before the data is built: a data.image_size / data.frames of 0
    takes the model's (built-in data keeps its own size: DataConfig.sized). Runs, a study's plan and
    its trials all decide it here; `resolve` then makes the model follow the data."""
    return replace(cfg, data=cfg.data.sized(cfg.model.hw[0], cfg.model.frames))


def input_note(asked: RunConfig, cfg: RunConfig) -> str:
    """One line where `asked`'s model was made for another input than the data's, which it takes
    (`cfg`, resolved), and why; "" where they agree: no mismatch is silent."""
    was, now, data = asked.model, cfg.model, asked.data
    if (was.hw, was.frames) == (now.hw, now.frames):
        return ""
    why = [f"data.{k}={v} given" for k, v in (("image_size", data.image_size), ("frames", data.frames))
           if v and v != getattr(was, k)]
    if was.hw != now.hw and not data.image_size:
        why.append(f"{data.name} is built-in data of {now.hw[0]} px; set data.image_size to change it")
    if was.hw != now.hw and not why:
        why.append("the data's items are square")
    return (f"note: the model is made for {_shape(was)}; it trains at the data's {_shape(now)} "
            f"({'; '.join(why)})")


def _shape(m) -> str:
    """A model's input as words: '224 px', '160x224 px, 16 frames'."""
    h, w = m.hw
    return (f"{h} px" if h == w else f"{h}x{w} px") + (f", {m.frames} frames" if m.frames > 1 else "")


def trains_at(cfg: RunConfig, info: DataInfo, sizes: tuple[int, int, int]) -> str:
    """A run's first log line: its task, model, input, tokens a sample, classes, and the sizes of
    its (train, val, test) splits."""
    m, t = cfg.model, cfg.train
    tokens = f"{m.num_patches} tokens a sample" + (f" (tubelet {m.tubelet})" if m.is_video else "")
    varies = (f"; steps at {','.join(map(str, t.resolutions))} px" if t.resolutions else
              "; train.multigrid varies the shape by step" if t.multigrid else "")
    classes = f"{info.num_classes} classes" if info.num_classes else "no labels"
    return (f"{cfg.task}: ViT depth {m.depth} width {m.width} heads {m.heads} patch {m.patch_size} at "
            f"{_shape(m)}{'' if m.is_video else ', 1 frame'}, {tokens}{varies}; {classes}; data {info.name}: "
            f"{sizes[0]:,} train, {sizes[1]:,} val, {sizes[2]:,} test items")


def resolve(cfg: RunConfig, info: DataInfo) -> RunConfig:
    """Make the model's input shape and classes those of the data (which sets the frames), and
    decide mae.norm_pix_loss=auto (the pretrain recipe's): on for real data, off for built-in digits."""
    if cfg.model.is_video and info.frames == 1:
        raise UserError(f"the model is a video model ({cfg.model.frames} frames) but data {info.name!r} "
                         "gives images; use video data (e.g. --data.name=moving-digits) or an image preset")
    model = cfg.model.replace(image_size=info.image_size, frames=info.frames, in_chans=info.in_chans,
                              tubelet=cfg.model.tubelet if info.frames > 1 else 1,
                              num_classes=info.num_classes)
    mae = cfg.mae
    if mae.norm_pix_loss == "auto":  # an explicit true / false stays
        mae = replace(mae, norm_pix_loss=not cfg.data.is_builtin)
    return replace(cfg, model=model, mae=mae)
