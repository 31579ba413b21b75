"""Fitting weights read from any format into a vitscale model, and saying what happened.

Every reader turns a checkpoint into a `Source`: its tensors renamed to vitscale's keys
(`ViT.state_dict()` names, or `MAE.state_dict()` names when it has a decoder), the
architecture they describe, and notes on anything assumed. `load_into` then fits a Source
into a model: it resamples or checks position tables, drops a class head on request, and
refuses, listing them, any key that is missing, unexpected or of the wrong shape, unless a
pattern allows it. Nothing is ever zero-filled or skipped without a line in the `Report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.models.layers import fixed_pos_embed, resample_pos_embed
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.presets import SIZES
from vitscale.models.vit import ViT, ViTConfig
from vitscale.weights.files import some

# Heads of the standard ViT widths (Ti/S/B/L/H, and vitscale's small presets): a state dict
# does not record them, and a wrong count would load without error and compute garbage.
STANDARD_HEADS = {width: heads for width, _, heads, _ in SIZES.values()}
TABLE_ATOL = 1e-5  # a stored table within this of a fixed table is that fixed table (float32 rounding)
ARCH_FIELDS = ("width", "depth", "heads", "mlp_ratio", "patch_size", "tubelet", "in_chans", "class_token",
               "qkv_bias")


@dataclass(frozen=True)
class Source:
    """Weights read from a checkpoint, renamed to vitscale's keys, and what they describe."""

    format: str  # "hf-vit", "hf-vit_mae", "hf-videomae", "timm", "mae", "videomae" or "vitscale"
    state: dict[str, Tensor]  # ViT keys, or MAE keys (encoder.*, decoder_*, mask_token) with a decoder;
    # position tables always as `pos_embed` / `decoder_pos_embed` [1, prefix + N, D], fixed ones included
    model: ViTConfig  # the architecture the weights describe
    mae: MAEConfig | None = None  # decoder and masking, for a pre-training checkpoint
    unmapped: tuple[str, ...] = ()  # source keys with no vitscale counterpart, by their source names
    head_extras: tuple[str, ...] = ()  # unmapped keys that belong to the class head (HF's pooler)
    inferred: frozenset[str] = frozenset()  # config fields guessed rather than read, e.g. "heads"
    notes: tuple[str, ...] = ()  # what was assumed or filled, in words
    labels: tuple[str, ...] = ()  # the head's class names, in id order, where the source names them (a
    # run's classes.json, a transformers config's id2label); () otherwise


@dataclass(frozen=True)
class Report:
    """What `load_into` did."""

    format: str  # the source format
    loaded: tuple[str, ...]  # model keys filled from the checkpoint
    resampled: tuple[str, ...] = ()  # position tables moved to another grid, and how
    left_out: tuple[str, ...] = ()  # checkpoint keys not loaded, each with its reason
    kept_init: tuple[str, ...] = ()  # model keys left at their initialisation, each with its reason
    notes: tuple[str, ...] = ()  # assumptions, checks, approximations

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [f"loaded {len(self.loaded)} tensors ({self.format})"]
        for title, items in [("resampled", self.resampled), ("left out", self.left_out),
                             ("kept at initialisation", self.kept_init), ("note", self.notes)]:
            lines += [f"  {title}: {item}" for item in _grouped(items)]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _grouped(items) -> list[str]:
    """'KEY (why)' lines sharing a reason become one: '38 keys (why): first, second, ...'."""
    by_reason: dict[str, list[str]] = {}
    for item in items:
        key, sep, why = item.partition(" (")
        by_reason.setdefault(f"({why}" if sep else "", []).append(key if sep else item)
    lines = []
    for why, keys in by_reason.items():
        if not why or len(keys) <= 3:
            lines += [f"{k} {why}".rstrip() for k in keys]
        else:
            lines.append(f"{len(keys)} keys {why}: {', '.join(keys[:3])}, ...")
    return lines


# ----------------------------------------------------------------------------- configs from shapes
def infer_config(state: dict[str, Tensor], *, pool: str, norm_eps: float, pos_embed: str | None,
                 grid_hint: tuple[int, int, int] | None, heads: int | None, image_size=None,
                 frames: int | None = None) -> tuple[ViTConfig, frozenset[str], list[str]]:
    """Read an encoder's architecture off its tensors (ViT keys).

    Width, depth, MLP ratio, patch, tubelet, channels, biases, the cls token and the head
    are in the shapes; heads are not: `heads` if given, else the standard count for the width
    (reported). The token grid comes from the stored position table (square images), else
    from `grid_hint`. `pos_embed` names a fixed table the format computes and does not store
    (VideoMAE's "sincos1d"); None means the table is stored. Returns (config, inferred fields, notes).
    """
    proj = state.get("patch_embed.proj.weight")
    if proj is None or "blocks.0.mlp.0.weight" not in state:
        raise UserError("the checkpoint has no patch embedding or first block under this format's names")
    width, depth = size_of(state)
    in_chans, patch = proj.shape[1], proj.shape[-1]
    tubelet = proj.shape[2] if proj.ndim == 5 else 1
    class_token = "cls_token" in state
    inferred, notes = set(), []
    if heads is None:
        if width not in STANDARD_HEADS:
            raise UserError(f"the checkpoint does not record its attention heads and width {width} is not a "
                             "standard one; pass the heads (--heads N, or a --model preset)")
        heads = STANDARD_HEADS[width]
        inferred.add("heads")
        notes.append(f"heads = {heads}: the standard count for width {width} (the weights do not record it; "
                     "pass --heads if the checkpoint used another)")
    n = state["pos_embed"].shape[1] - int(class_token) if "pos_embed" in state else None
    grid = _grid(n, tubelet, patch, grid_hint, image_size, frames)
    t, h, w = grid
    if pos_embed is None:  # stored: is it a fixed table after all (MAE's frozen sin-cos)?
        pos_embed = classify_table(state["pos_embed"], width, grid, int(class_token))
    cfg = ViTConfig(
        image_size=h * patch if h == w else (h * patch, w * patch), patch_size=patch, frames=t * tubelet,
        tubelet=tubelet, in_chans=in_chans, width=width, depth=depth, heads=heads,
        mlp_ratio=state["blocks.0.mlp.0.weight"].shape[0] / width,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        pool=pool if class_token else "mean", class_token=class_token, pos_embed=pos_embed,
        qkv_bias="blocks.0.attn.qkv.bias" in state, norm_eps=norm_eps)
    return cfg, frozenset(inferred), notes


DECODER_KEYS = ("decoder_blocks", "decoder_embed.weight")  # an MAE decoder's blocks and width, for size_of


def size_of(state: dict[str, Tensor], blocks: str = "blocks", embed: str = "patch_embed.proj.weight"
            ) -> tuple[int | None, int]:
    """(width, depth) of an encoder's keys (with *DECODER_KEYS, a decoder's): the embedding's width
    (None without one), and the number of blocks, which must be numbered 0 .. depth - 1."""
    numbers = {k.split(".")[1] for k in state if k.startswith(blocks + ".")}
    odd = sorted(n for n in numbers if not n.isdigit() or int(n) >= len(numbers))
    if odd:
        raise UserError(f"the checkpoint's {blocks} are not numbered 0 to {len(numbers) - 1}: it has "
                         f"{blocks}.{odd[0]} ({len(numbers)} in all)")
    return (state[embed].shape[0] if embed in state else None), len(numbers)


def check_sizes(where: str, sizes: list[tuple[str, int, int | None]]) -> None:
    """A config read beside the weights must describe them: each (field, its value in the config,
    the weights' value, None if they do not show it) agrees. Checked before a model of the
    config's size is built: a wrong depth of 10**9 must not build it."""
    for field, said, found in sizes:
        if found is not None and said != found:
            raise UserError(f"{where} says {field} {said}, but the weights have {found}; the config does not "
                             "describe these weights (restore it, or export the model again)")


# Dimensions each tensor must have, by its vitscale key (first pattern that matches): shapes are
# read off these tensors, and a scalar where a matrix belongs must stop here, named.
NDIMS = (("*pos_embed", (3,)), ("*_token", (3,)), ("*patch_embed.proj.weight", (4, 5)),
         ("*norm*.weight", (1,)), ("*bias", (1,)), ("*.weight", (2,)))


def check_ndims(state: dict[str, Tensor]) -> None:
    """Refuse, by key, a tensor with another number of dimensions than its key implies."""
    for key, tensor in state.items():
        want = next((n for pattern, n in NDIMS if fnmatch(key, pattern)), None)
        if want is not None and tensor.ndim not in want:
            raise UserError(f"the checkpoint's {key} has shape {tuple(tensor.shape)}, where a ViT's has "
                             f"{' or '.join(map(str, want))} dimensions; the file is not the model it claims")


def _grid(n: int | None, tubelet: int, patch: int, hint, image_size, frames) -> tuple[int, int, int]:
    """The token grid of a checkpoint whose position table has n rows (None: not stored).

    Candidates, first that fits n wins: the given sizes, the hint (the target model's
    grid), a square image grid, a square grid at the given frame count. With no stored
    table the given sizes or the hint decide (a fixed table is exact at any grid).
    """
    candidates = []
    t = frames // tubelet if frames else None
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        h, w = h // patch, w // patch
        candidates.append((t or (n // (h * w) if n and tubelet > 1 else 1), h, w))
    if hint is not None:
        candidates.append(hint)
    for steps in [1] if tubelet == 1 else [t] if t else []:
        if n is not None and n % steps == 0 and math.isqrt(n // steps) ** 2 == n // steps:
            candidates.append((steps, math.isqrt(n // steps), math.isqrt(n // steps)))
    for grid in candidates:
        if n is None or n == grid[0] * grid[1] * grid[2]:
            return tuple(grid)
    what = f"its {n}-row position table" if n is not None else "it (its position table is not stored)"
    raise UserError(f"cannot tell the input size of this checkpoint from {what}; pass --image-size "
                     "(and --frames for video), or a --model preset of its size")


def classify_table(pos: Tensor, width: int, grid, prefix: int) -> str:
    """"sincos" or "sincos1d" if a stored table [1, prefix + N, D] is that fixed table, else "learned"."""
    for kind in ("sincos", "sincos1d"):
        if is_table(pos, kind, width, grid, prefix):
            return kind
    return "learned"


def fixed_table(kind: str, width: int, grid, prefix: int) -> Tensor:
    """[1, prefix + N, D]: a fixed table with zero rows for the cls token (as MAE stores it)."""
    return torch.cat([torch.zeros(prefix, width), fixed_pos_embed(kind, width, grid)])[None]


def is_table(pos: Tensor, kind: str, width: int, grid, prefix: int) -> bool:
    """Whether a stored table [1, prefix + N, D] is the fixed table of a kind (to float32 rounding)."""
    n = grid[0] * grid[1] * grid[2]
    if pos.shape != (1, prefix + n, width) or width % (4 if kind == "sincos" else 2):
        return False
    expected = fixed_table(kind, width, grid, prefix)
    return bool(torch.allclose(pos.float(), expected, atol=TABLE_ATOL, rtol=0))


# ----------------------------------------------------------------------------- muP multipliers
def mup_factors(cfg: ViTConfig) -> tuple[float, float, float]:
    """(q scale, residual branch, readout) factors that make cfg's model an SP one: all 1 under SP.

    q: muP's attention logit scale over SP's 1/sqrt(head dim); branch: the depth-muP branch
    multiplier; readout: the class head's input multiplier.
    """
    q = cfg.attn_scale * math.sqrt(cfg.head_dim) if cfg.attn_scale is not None else 1.0
    return q, cfg.branch_mult, cfg.readout_mult


def fold_mup(state: dict[str, Tensor], cfg: ViTConfig, prefix: str = "",
             inverse: bool = False) -> tuple[dict[str, Tensor], ViTConfig]:
    """A muP ViT's weights with its multipliers folded in: the same function as an SP model.

    The q rows of each qkv weight and bias take the logit scale's ratio to SP's, attn.proj and
    mlp fc2 (weight and bias) the branch multiplier, the head's weight the readout multiplier
    (its bias is added after the multiplier). Returns (state, the SP config). `inverse` unfolds
    SP weights into cfg's muP model instead (returning cfg). `prefix` is where the encoder's
    keys start ("encoder." in an MAE). Keys absent from `state` are skipped.
    """
    factors = mup_factors(cfg)
    if factors == (1.0, 1.0, 1.0):
        return state, cfg
    q, branch, readout = (1.0 / f for f in factors) if inverse else factors
    out = dict(state)

    def scaled(key: str, factor: float, rows: int | None = None) -> None:
        if key in out and factor != 1.0:
            t = out[key].clone()
            t[:rows] *= factor  # rows=None: the whole tensor
            out[key] = t

    for i in range(cfg.depth):
        block = f"{prefix}blocks.{i}."
        for name in ("attn.qkv.weight", "attn.qkv.bias"):
            scaled(block + name, q, rows=cfg.width)  # qkv rows run (q, k, v) x heads x head dim
        for name in ("attn.proj.weight", "attn.proj.bias", "mlp.2.weight", "mlp.2.bias"):
            scaled(block + name, branch)
    scaled(f"{prefix}head.weight", readout)
    sp = cfg.replace(param="sp", base_width=0, base_depth=0, base_head_dim=0)
    return out, cfg if inverse else sp


def refold(state: dict[str, Tensor], src: ViTConfig, dst: ViTConfig, prefix: str = "") -> tuple[dict, str]:
    """Weights of a model of config `src` made to compute the same in a model of config `dst`
    (whose muP multipliers may differ). Returns (state, a line for the report, or "")."""
    if mup_factors(src) == mup_factors(dst):
        return state, ""
    state, _ = fold_mup(state, src, prefix)
    state, _ = fold_mup(state, dst, prefix, inverse=True)
    return state, (f"muP multipliers folded into the weights (checkpoint param={src.param}, "
                   f"this model param={dst.param})")


# ----------------------------------------------------------------------------- fitting
def load_into(model: nn.Module, source: Source, *, head: bool = True, allow: tuple[str, ...] = ()) -> Report:
    """Load a Source into a ViT or an MAE; raise, listing them, on keys that do not fit.

    Args:
        model: a `ViT` or an `MAE` (an MAE source's decoder is left out when loading a ViT).
        source: from a reader (`vitscale.weights.read`).
        head: load the class head (False: drop it, the model's head stays new).
        allow: fnmatch patterns of keys that may be missing, unexpected or of another shape;
            such model keys keep their initialisation, such checkpoint keys are left out.
    """
    is_mae = isinstance(model, MAE)
    cfg = model.encoder.cfg if is_mae else model.cfg
    enc = "encoder." if is_mae else ""
    state, left, kept, resampled = dict(source.state), {}, {}, []
    notes = list(source.notes)
    if source.mae is not None and not is_mae:  # an encoder from a pre-training checkpoint
        for k in [k for k in state if not k.startswith("encoder.")]:
            left[k] = "pre-training decoder"
            del state[k]
        state = {k[len("encoder."):]: v for k, v in state.items()}
    elif is_mae and source.mae is None:
        state = {f"encoder.{k}": v for k, v in state.items()}
    _check_architecture(source, cfg, model.cfg if is_mae else None)
    notes += _differences(source.model, cfg)
    state, folded = refold(state, source.model, cfg, enc)
    notes += [folded] if folded else []
    unmapped = list(source.unmapped)
    if not head:
        for k in [k for k in state if k.startswith(f"{enc}head.")] + \
                 [k for k in unmapped if any(fnmatch(k, p) for p in source.head_extras)]:
            left[k] = "class head dropped"
            state.pop(k, None)
        unmapped = [k for k in unmapped if k not in left]
    own = model.state_dict()
    if f"{enc}pos_embed" in state:
        pos = state.pop(f"{enc}pos_embed")
        table, message = _fit_pos(pos, source.model, cfg, own.get(f"{enc}pos_embed"))
        if table is not None:
            state[f"{enc}pos_embed"] = table
        if message:
            (resampled if "from grid" in message else notes).append(message)
    if "decoder_pos_embed" in state:
        notes.append(_check_decoder_pos(state.pop("decoder_pos_embed"), model, source.model.grid))

    def allowed(key: str) -> bool:
        return any(fnmatch(key, p) for p in allow)

    new_head = [k for k in own if not head and k.startswith(f"{enc}head.")]
    missing = [k for k in own if k not in state and k not in new_head]
    unexpected = [k for k in state if k not in own] + unmapped
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    problems = [(what, [k for k in keys if not allowed(k.split(" ")[0])])
                for what, keys in [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)]]
    if any(keys for _, keys in problems):
        hint = _arch_hint(source.model, cfg) or "if meant, allow them by pattern: --allow, --init-allow"
        raise UserError(
            f"the {source.format} weights do not fit this model: "
            + "; ".join(f"{what}: {some(keys, 10)}" for what, keys in problems if keys)
            + f" ({hint})")
    kept |= {k: "new class head" for k in new_head}
    kept |= {k: "allowed missing" for k in missing}
    for item in wrong:
        k = item.split(" ")[0]
        kept[k] = f"allowed other shape ({item[len(k) + 1:]})"
        left[k] = kept[k]
        del state[k]
    left |= {k: "allowed unexpected" for k in unexpected}
    loaded = [k for k in own if k in state]
    model.load_state_dict({k: state.get(k, own[k]) for k in own}, strict=True)
    return Report(format=source.format, loaded=tuple(loaded), resampled=tuple(resampled),
                  left_out=tuple(f"{k} ({why})" for k, why in left.items()),
                  kept_init=tuple(f"{k} ({why})" for k, why in kept.items()), notes=tuple(notes))


def _fit_pos(pos: Tensor, src: ViTConfig, dst: ViTConfig, own: Tensor | None) -> tuple[Tensor | None, str]:
    """A source position table [1, prefix + N, D] made to fit the model.

    Returns (table for a learned `pos_embed`, or None when the model computes a fixed
    table, which the source's must then equal; a line for the report).
    """
    rows, patches = pos[:, : src.num_prefix], pos[:, src.num_prefix:]  # [1, p, D], [1, N, D]
    if pos.shape[-1] != dst.width:
        return pos, ""  # another width: reported with the other keys of the wrong shape
    if dst.pos_embed != "learned":
        if not is_table(pos, dst.pos_embed, dst.width, src.grid, src.num_prefix):
            raise UserError(f"the checkpoint's position table is not the fixed {dst.pos_embed} table this "
                             "model computes; use a learned one (--model.pos_embed=learned) to load it")
        return None, f"pos_embed: the checkpoint's table is this model's fixed {dst.pos_embed} table"
    message = ""
    if src.grid != dst.grid:
        if src.pos_embed == "learned":
            patches = resample_pos_embed(patches, src.grid, dst.grid)  # [1, N', D]
            ways = [way for way, changed in [("bicubic in space", src.grid[1:] != dst.grid[1:]),
                                             ("linear in time", src.grid[0] != dst.grid[0])] if changed]
            how = f"resampled ({', '.join(ways)})"
        else:  # a fixed table is exact at any grid: compute it rather than interpolate
            patches = fixed_pos_embed(src.pos_embed, patches.shape[-1], dst.grid)[None].to(patches)
            how = f"recomputed (the source's fixed {src.pos_embed} table)"
        message = f"pos_embed: {how} from grid {src.grid} to {dst.grid}"
    if dst.num_prefix < src.num_prefix:
        rows = rows[:, : dst.num_prefix]
        message = "; ".join(filter(None, [message, "pos_embed: the cls token's row left out"]))
    elif dst.num_prefix > src.num_prefix and own is not None:
        rows = own[:, : dst.num_prefix].to(patches)
        message = "; ".join(filter(None, [message, "pos_embed: the cls token's row kept at initialisation"]))
    return torch.cat([rows, patches], dim=1), message


def _check_decoder_pos(pos: Tensor, model: nn.Module, grid) -> str:
    """MAE decoders use a fixed table: the checkpoint's must be the one the model computes."""
    if not isinstance(model, MAE):
        return "decoder_pos_embed: left out with the decoder"
    expected = model._decoder_pos(grid)
    if pos.shape != expected.shape:
        return f"decoder_pos_embed: shape {tuple(pos.shape)}, the model's {tuple(expected.shape)}"
    kind = model.cfg.decoder_pos_embed
    if not torch.allclose(pos.float(), expected, atol=TABLE_ATOL, rtol=0):
        raise UserError(f"the checkpoint's decoder position table is not the fixed {kind} table this MAE "
                         "decoder computes (see --mae.decoder_pos_embed: sincos or sincos1d)")
    return f"decoder_pos_embed: this decoder's fixed {kind} table"


def _check_architecture(source: Source, cfg: ViTConfig, mae: MAEConfig | None) -> None:
    """Head counts are invisible in the shapes: a mismatch would load and compute garbage."""
    src = source.model
    if "heads" not in source.inferred and src.heads != cfg.heads and src.width == cfg.width:
        raise UserError(f"the checkpoint's attention has {src.heads} heads, this model {cfg.heads}; "
                         f"use --model.heads={src.heads}")
    dec = source.mae
    if mae is not None and dec is not None and "decoder_heads" not in source.inferred \
            and dec.decoder_heads != mae.decoder_heads and dec.decoder_width == mae.decoder_width:
        raise UserError(f"the checkpoint's decoder has {dec.decoder_heads} heads, this model "
                         f"{mae.decoder_heads}; use --mae.decoder_heads={dec.decoder_heads}")


def _differences(src: ViTConfig, dst: ViTConfig) -> list[str]:
    """Settings that change outputs without changing any shape."""
    notes = []
    if src.norm_eps != dst.norm_eps:
        notes.append(f"LayerNorm eps: the checkpoint's {src.norm_eps:g}, this model's {dst.norm_eps:g} "
                     f"(set --model.norm_eps={src.norm_eps:g} to match)")
    if src.pool != dst.pool:
        notes.append(f"pooling: the checkpoint's {src.pool!r}, this model's {dst.pool!r}")
    return notes


def _arch_hint(src: ViTConfig, dst: ViTConfig) -> str:
    """Which model settings would make the checkpoint fit."""
    diffs = [f"{f}={getattr(src, f)}" for f in ARCH_FIELDS if getattr(src, f) != getattr(dst, f)]
    return f"the checkpoint's model has {' '.join(diffs)}: set them, e.g. --model.{diffs[0]}" if diffs else ""


def build(source: Source, *, image_size=None, frames: int | None = None, num_classes: int | None = None,
          head: bool = True, allow: tuple[str, ...] = ()) -> tuple[nn.Module, Report]:
    """A new ViT (or MAE, for a pre-training checkpoint) of the source's architecture, loaded.

    `image_size` / `frames` resample the position table; a `num_classes` other than the
    checkpoint's gives a new head (the checkpoint's is left out).
    """
    changes = {k: v for k, v in [("image_size", image_size), ("frames", frames), ("num_classes", num_classes)]
               if v is not None}
    cfg = source.model.replace(**changes)
    if num_classes is not None and num_classes != source.model.num_classes:
        head = False
    model = MAE(cfg, source.mae) if source.mae is not None else ViT(cfg)
    return model, load_into(model, source, head=head, allow=allow)
