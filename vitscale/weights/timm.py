"""timm's VisionTransformer, and the original MAE and VideoMAE checkpoints built on it.

Layouts (key names as the projects publish them):
  timm       cls_token, pos_embed [1, 1 + N, D], patch_embed.proj, blocks.N.{norm1, attn.qkv,
             attn.proj, norm2, mlp.fc1, mlp.fc2}, norm (or fc_norm after mean pooling), head.
  mae        facebookresearch/mae models_mae.py: the timm encoder plus mask_token,
             decoder_embed, decoder_pos_embed (fixed sin-cos, stored), decoder_blocks.N.*,
             decoder_norm, decoder_pred. Its fine-tuned models are timm models.
  videomae   MCG-NJU/VideoMAE: a Conv3d tubelet patch_embed, attn.q_bias and attn.v_bias and
             no key bias, a fixed 1D sinusoid table that is not stored. Pre-training keys sit
             under encoder. / decoder. (decoder.blocks.N, decoder.norm, decoder.head) with
             encoder_to_decoder (no bias) and mask_token; fine-tuned ones are timm-like with
             fc_norm after mean pooling.
All use LayerNorm eps 1e-6 and exact GELU. State dicts record no head counts: they come
from the caller, or from the standard count for the width (see core.infer_config).
"""

from __future__ import annotations

import torch

from vitscale.common.errors import UserError
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.vit import ViTConfig
from vitscale.weights.core import (
    DECODER_KEYS,
    Source,
    check_ndims,
    classify_table,
    fixed_table,
    infer_config,
    size_of,
)
from vitscale.weights.files import State, fuse_qkv, rename, rules

BLOCK = [("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.q_bias", "attn.q_bias"),
         ("attn.v_bias", "attn.v_bias"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
         ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")]
DECODER = [("mask_token", "mask_token"), ("decoder_embed", "decoder_embed"),
           ("decoder_pos_embed", "decoder_pos_embed"), ("decoder_norm", "decoder_norm"),
           ("decoder_pred", "decoder_pred")]
VIDEOMAE_DECODER = [("mask_token", "mask_token"), ("encoder_to_decoder", "decoder_embed"),
                    ("decoder.norm", "decoder_norm"), ("decoder.head", "decoder_pred")]
DEFAULT_MAE = {  # training settings a checkpoint does not record: each project's published recipe
    "mae": dict(mask_ratio=0.75, masking="random", norm_pix_loss=True, decoder_pos_embed="sincos"),
    "videomae": dict(mask_ratio=0.9, masking="tube", norm_pix_loss=True, norm_pix_by="channel",
                     decoder_pos_embed="sincos1d"),
}


def encoder_pairs(src: str = "", dst: str = "", norm: str = "norm") -> list[tuple[str, str]]:
    """(timm name, vitscale name) prefixes of an encoder; `norm` is "norm" or "fc_norm"."""
    top = [("cls_token", "cls_token"), ("pos_embed", "pos_embed"), ("patch_embed.proj", "patch_embed.proj"),
           (norm, "norm"), ("head", "head")]
    blocks = [(f"blocks.{{i}}.{a}", f"blocks.{{i}}.{b}") for a, b in BLOCK]
    return [(src + a, dst + b) for a, b in top + blocks]


def layout_of(keys) -> str | None:
    """"mae", "videomae" or "timm" from a state dict's keys, or None."""
    keys = set(keys)
    if "encoder_to_decoder.weight" in keys or any(k.startswith("encoder.blocks.") for k in keys):
        return "videomae"
    if "decoder_embed.weight" in keys or any(k.startswith("decoder_blocks.") for k in keys):
        return "mae"
    if any(k.endswith(".attn.q_bias") for k in keys) and "blocks.0.attn.qkv.weight" in keys:
        return "videomae"
    if "blocks.0.attn.qkv.weight" in keys:
        return "timm"
    return None


def read(tensors: State, fmt: str, *, like: ViTConfig | None = None, heads: int | None = None,
         decoder_heads: int | None = None, image_size=None, frames: int | None = None) -> Source:
    """A timm / MAE / VideoMAE state dict as a Source (`fmt` from `layout_of`).

    `like` (the model the weights are for) lends its heads and token grid where the
    checkpoint records neither; `heads`, `image_size`, `frames` say them outright.
    """
    pretrain_video = fmt == "videomae" and "encoder_to_decoder.weight" in tensors
    fc_norm = any(k.endswith("fc_norm.weight") for k in tensors)
    if pretrain_video:
        pairs = encoder_pairs("encoder.", "encoder.") + VIDEOMAE_DECODER + \
            [(f"decoder.blocks.{{i}}.{a}", f"decoder_blocks.{{i}}.{b}") for a, b in BLOCK]
    elif fmt == "mae":
        pairs = encoder_pairs(dst="encoder.", norm="fc_norm" if fc_norm else "norm") + DECODER + \
            [(f"decoder_blocks.{{i}}.{a}", f"decoder_blocks.{{i}}.{b}") for a, b in BLOCK]
    else:
        pairs = encoder_pairs(norm="fc_norm" if fc_norm else "norm")
    state, unmapped = rename(tensors, rules(pairs))
    check_ndims(state)
    state, notes = fuse_qkv(state)
    has_decoder = pretrain_video or fmt == "mae"
    enc = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")} if has_decoder else state
    inferred = set()
    if heads is None and like is not None:
        heads = like.heads
        inferred.add("heads")
    if "pos_embed" not in enc and fmt != "videomae":
        raise UserError("the checkpoint has no position table (pos_embed)")
    cfg, more, infer_notes = infer_config(
        enc, pool="mean" if fc_norm else "cls", norm_eps=1e-6,
        pos_embed=None if "pos_embed" in enc else "sincos1d",
        grid_hint=like.grid if like is not None else None, heads=heads, image_size=image_size, frames=frames)
    notes += infer_notes
    if "pos_embed" not in enc:  # VideoMAE computes its table: the same table, at this grid
        enc["pos_embed"] = fixed_table("sincos1d", cfg.width, cfg.grid, cfg.num_prefix)
        notes.append(f"pos_embed: VideoMAE's fixed sinusoid table for grid {cfg.grid} (computed, not stored)")
    mae = None
    if has_decoder:
        if pretrain_video and "decoder_embed.bias" not in state:
            state["decoder_embed.bias"] = torch.zeros(state["decoder_embed.weight"].shape[0])
            notes.append("decoder_embed bias set to zero (VideoMAE's encoder_to_decoder has none: the same "
                         "function)")
        recipe = "videomae" if pretrain_video else "mae"
        mae, decoder_inferred, decoder_notes = decoder_config(state, cfg, recipe, decoder_heads)
        inferred |= decoder_inferred
        notes += decoder_notes
        state = {f"encoder.{k}": v for k, v in enc.items()} | {k: v for k, v in state.items()
                                                                if not k.startswith("encoder.")}
    else:
        state = enc
    return Source(format=fmt, state=state, model=cfg, mae=mae, unmapped=tuple(unmapped),
                  head_extras=("pre_logits.*", "head_dist.*", "dist_token"),
                  inferred=frozenset(inferred | more), notes=tuple(notes))


def decoder_config(state: State, cfg: ViTConfig, fmt: str, heads: int | None) -> tuple[MAEConfig, set, list]:
    """The MAE decoder a state dict holds; what it does not record (heads, masking) from the
    published recipe of `fmt` ("mae" or "videomae")."""
    width, depth = size_of(state, *DECODER_KEYS)
    if width is None:
        raise UserError("the checkpoint has decoder blocks but no decoder_embed.weight")
    inferred, notes, settings = set(), [], dict(DEFAULT_MAE[fmt])
    if heads is None:
        heads = 16 if fmt == "mae" else max(1, width // 64)  # MAE: 16 for every size; VideoMAE: 64 per head
        inferred.add("decoder_heads")
        notes.append(f"decoder heads = {heads}: the {fmt} default for width {width} (not recorded; pass "
                     "--decoder-heads if the checkpoint used another)")
    hidden = state.get("decoder_blocks.0.mlp.0.weight")
    if hidden is not None and hidden.shape[0] != int(width * cfg.mlp_ratio):
        raise UserError(f"the decoder's MLP is {hidden.shape[0]} wide, not the encoder's ratio "
                         f"{cfg.mlp_ratio:g} x {width}; vitscale's MAE decoder uses the encoder's ratio")
    if "decoder_pos_embed" in state:
        kind = classify_table(state["decoder_pos_embed"], width, cfg.grid, cfg.num_prefix)
        if kind == "learned":
            raise UserError("the decoder's position table is not a fixed sin-cos table; vitscale's MAE "
                             "decoder computes a fixed one")
        settings["decoder_pos_embed"] = kind
    notes.append(f"masking {settings['masking']} at {settings['mask_ratio']:g}, norm-pix by "
                 f"{settings.get('norm_pix_by', 'patch')}, norm_pix_loss="
                 f"{settings['norm_pix_loss']}: the {fmt} recipe (a checkpoint does not record them)")
    mae = MAEConfig(decoder_width=width, decoder_depth=depth, decoder_heads=heads, **settings)
    return mae, inferred, notes


# ----------------------------------------------------------------------------- export
def write_state(model) -> State:
    """A ViT in timm's layout, or an MAE in the original MAE layout (timm's plus decoder_*).

    Fixed position tables are written out (timm's pos_embed is a parameter; MAE stores its
    frozen tables too), and mean pooling's norm is named fc_norm, as timm names it.
    """
    if isinstance(model, MAE):
        state = {**model.state_dict(), "decoder_pos_embed": model.decoder_pos}
        vit, enc = model.encoder, "encoder."
        pairs = encoder_pairs(dst=enc) + DECODER + \
            [(f"decoder_blocks.{{i}}.{a}", f"decoder_blocks.{{i}}.{b}") for a, b in BLOCK]
    else:
        state, vit, enc = model.state_dict(), model, ""
        pairs = encoder_pairs(norm="fc_norm" if model.cfg.pool == "mean" else "norm")
    if vit.cfg.pos_embed != "learned":
        state[f"{enc}pos_embed"] = vit.pos_embed
    out, unmatched = rename(state, rules(pairs, reverse=True))
    assert not unmatched, unmatched  # every vitscale key has a timm name
    return out

