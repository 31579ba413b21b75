"""Hugging Face transformers: ViT, ViTMAE and VideoMAE directories, in and out.

A directory holds config.json and model.safetensors (or pytorch_model.bin, or shards with
an index). The vitscale config is read from config.json. Key names are the ones published
checkpoints use (transformers 4: `vit.encoder.layer.N.attention.attention.query`, ...), which
transformers 5 still writes and reads; its in-memory names (`vit.layers.N.attention.q_proj`)
are read too.

What transformers computes differently, and how it maps:
  - ViT / ViTMAE: separate query, key, value (fused here), LayerNorm eps layer_norm_eps
    (1e-12 by default), cls pooling after the final norm.
  - ViTMAE stores its fixed sin-cos tables; they are checked against vitscale's (MAE's order).
    It keeps int(N * (1 - mask_ratio)) tokens, vitscale round(...): the same for usual sizes.
  - VideoMAE: input [B, T, C, H, W] (vitscale: [B, C, T, H, W]); a 1D sinusoid table it
    computes and never stores (vitscale's pos_embed "sincos1d"); query and value biases only;
    mean pooling then fc_norm; fc_norm and the decoder's norm use PyTorch's default eps 1e-5,
    not layer_norm_eps (vitscale uses one eps: a relative difference of about 1e-5 / var).
    Its pre-training loss un-normalises ImageNet-normalised inputs and, with norm_pix_loss,
    normalises each channel of a patch on its own (read as mae.norm_pix_by="channel"); vitscale's
    loss takes the input as given, which under per-channel normalisation differs only by eps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitscale.common.errors import UserError
from vitscale.models.mae import MAE, MAEConfig, num_visible
from vitscale.models.vit import ViTConfig
from vitscale.weights.core import (
    DECODER_KEYS,
    Source,
    check_ndims,
    check_sizes,
    classify_table,
    fixed_table,
    is_table,
    size_of,
)
from vitscale.weights.files import State, fuse_qkv, read_json, read_tensors, rename, rules, split_qkv

LAYER = [("layernorm_before", "norm1"), ("attention.attention.query", "attn.q"),
         ("attention.attention.key", "attn.k"), ("attention.attention.value", "attn.v"),
         ("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.v_bias", "attn.v_bias"),
         ("attention.output.dense", "attn.proj"), ("layernorm_after", "norm2"),
         ("intermediate.dense", "mlp.0"), ("output.dense", "mlp.2")]
LAYER_V5 = [("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.q_proj", "attn.q"),
            ("attention.k_proj", "attn.k"), ("attention.v_proj", "attn.v"), ("attention.o_proj", "attn.proj"),
            ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")]
ARCHITECTURES = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "vit_mae": ("ViTMAEModel", "ViTMAEForPreTraining"),
    "videomae": ("VideoMAEModel", "VideoMAEForVideoClassification", "VideoMAEForPreTraining"),
}
BASE = {"vit": "vit", "vit_mae": "vit", "videomae": "videomae"}  # attribute holding the encoder
ENCODER_DEFAULTS = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                        layer_norm_eps=1e-12)
DEFAULTS = {  # transformers' config defaults: config.json may leave out any field at its default
    "vit": ENCODER_DEFAULTS | dict(qkv_bias=True),
    "vit_mae": ENCODER_DEFAULTS | dict(qkv_bias=True, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                                       decoder_num_attention_heads=16, decoder_intermediate_size=2048,
                                       mask_ratio=0.75, norm_pix_loss=False),
    "videomae": ENCODER_DEFAULTS | dict(num_frames=16, tubelet_size=2, qv_bias=True, use_mean_pooling=True,
                                        decoder_hidden_size=384, decoder_num_hidden_layers=4,
                                        decoder_num_attention_heads=6, decoder_intermediate_size=1536,
                                        norm_pix_loss=True),
}
def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


CHECKS = {  # what a config.json field may hold, by its description
    "a positive integer": _count,
    "a positive integer or a pair of them": lambda v: _count(v) or (
        isinstance(v, list) and len(v) == 2 and all(map(_count, v))),
    "true or false": lambda v: isinstance(v, bool),
    "a positive number": lambda v: _number(v) and v > 0,
    "a number in [0, 1)": lambda v: _number(v) and 0 <= v < 1,
    "a string": lambda v: isinstance(v, str),
}
FIELDS = {  # config.json fields vitscale reads, by what each must hold
    "a positive integer": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "num_channels", "num_frames", "tubelet_size", "decoder_hidden_size",
                           "decoder_num_hidden_layers", "decoder_num_attention_heads",
                           "decoder_intermediate_size"),
    "a positive integer or a pair of them": ("image_size", "patch_size"),
    "true or false": ("qkv_bias", "qv_bias", "use_mean_pooling", "norm_pix_loss"),
    "a positive number": ("layer_norm_eps",),
    "a number in [0, 1)": ("mask_ratio",),
    "a string": ("hidden_act",),
}
KINDS = {field: kind for kind, names in FIELDS.items() for field in names}
DIVIDES = [("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads"),
           ("num_frames", "tubelet_size")]
TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default, which VideoMAE's fc_norm and decoder norm keep


def _layers(src: str, dst: str, table=LAYER) -> list[tuple[str, str]]:
    return [(f"{src}.{{i}}.{a}", f"{dst}.{{i}}.{b}") for a, b in table]


def pairs(model_type: str, arch: str, norm: str = "layernorm") -> list[tuple[str, str]]:
    """(Hugging Face name, vitscale name) prefixes, published names first, for one architecture.

    `norm` is where vitscale's final norm lives: the encoder's "layernorm" or VideoMAE's "fc_norm".
    """
    base, pretrain = BASE[model_type], arch.endswith("ForPreTraining")
    enc = "encoder." if pretrain else ""
    out = [(f"{base}.embeddings.cls_token", f"{enc}cls_token"),
           (f"{base}.embeddings.position_embeddings", f"{enc}pos_embed"),
           (f"{base}.embeddings.patch_embeddings.projection", f"{enc}patch_embed.proj"),
           ("fc_norm" if norm == "fc_norm" else f"{base}.layernorm", f"{enc}norm"), ("classifier", "head")]
    out += _layers(f"{base}.encoder.layer", f"{enc}blocks")
    out += _layers(f"{base}.layers", f"{enc}blocks", LAYER_V5)
    if pretrain and model_type == "vit_mae":
        out += [("decoder.decoder_embed", "decoder_embed"), ("decoder.mask_token", "mask_token"),
                ("decoder.decoder_pos_embed", "decoder_pos_embed"), ("decoder.decoder_norm", "decoder_norm"),
                ("decoder.decoder_pred", "decoder_pred")]
        out += _layers("decoder.decoder_layers", "decoder_blocks") + \
            _layers("decoder.decoder_layers", "decoder_blocks", LAYER_V5) + \
            _layers("decoder.decoder_encoder.layer", "decoder_blocks")  # as transformers 5.x writes it
    elif pretrain:
        out += [("encoder_to_decoder", "decoder_embed"), ("mask_token", "mask_token"),
                ("decoder.norm", "decoder_norm"), ("decoder.head", "decoder_pred")]
        out += _layers("decoder.decoder_layers", "decoder_blocks")
    return out


# ----------------------------------------------------------------------------- import
def read(directory: Path) -> Source:
    """A transformers model directory as a Source."""
    path = directory / "config.json"
    config = read_json(path)
    model_type, archs = str(config.get("model_type")), config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if model_type not in ARCHITECTURES or arch not in ARCHITECTURES[model_type]:
        known = ", ".join(a for archs in ARCHITECTURES.values() for a in archs)
        raise UserError(f"{str(path)!r}: model_type {model_type!r}, architectures {archs!r}: vitscale reads "
                         f"{known}")
    if model_type == "videomae" and "qkv_bias" in config:  # transformers' alias of qv_bias
        config["qv_bias"] = config.pop("qkv_bias")
    config = _checked(DEFAULTS[model_type] | config, model_type, path)
    tensors = _read_weights(directory)
    base = BASE[model_type]
    # A bare encoder (ViTModel, ...) is saved without its attribute prefix.
    tensors = {f"{base}.{k}" if k.split(".")[0] in ("embeddings", "encoder", "layernorm", "layers") else k: v
               for k, v in tensors.items()}
    video, pretrain = model_type == "videomae", arch.endswith("ForPreTraining")
    norm = "fc_norm" if "fc_norm.weight" in tensors else "layernorm"
    state, unmapped = rename(tensors, rules(pairs(model_type, arch, norm)))
    check_ndims(state)
    state, notes = fuse_qkv(state)
    cfg, notes = _vit_config(config, state, model_type, arch, notes)
    enc = "encoder." if pretrain else ""
    width, depth = size_of({k[len(enc):]: v for k, v in state.items() if k.startswith(enc)})
    sizes = [("hidden_size", cfg.width, width), ("num_hidden_layers", cfg.depth, depth)]
    if f"{enc}pos_embed" in state:  # ViT and ViTMAE store their table: one row per patch, and the cls token's
        sizes.append(("patches (image_size / patch_size, squared)", cfg.num_patches,
                      state[f"{enc}pos_embed"].shape[1] - 1))
    if pretrain:
        width, depth = size_of(state, *DECODER_KEYS)
        sizes += [("decoder_hidden_size", config["decoder_hidden_size"], width),
                  ("decoder_num_hidden_layers", config["decoder_num_hidden_layers"], depth)]
    check_sizes(repr(str(path)), sizes)
    if video:
        state[f"{enc}pos_embed"] = fixed_table("sincos1d", cfg.width, cfg.grid, 0)
        notes.append("pos_embed: VideoMAE's fixed sinusoid table (computed, as transformers does)")
    mae = None
    if pretrain:
        mae, notes = _mae_config(config, state, cfg, video, notes)
    return Source(format=f"hf-{model_type}", state=state, model=cfg, mae=mae, unmapped=tuple(unmapped),
                  head_extras=("pooler.*",), notes=tuple(notes), labels=labels_of(config, cfg.num_classes))


def _checked(config: dict, model_type: str, path: Path) -> dict:
    """config.json over transformers' defaults, each field vitscale reads checked (one line naming
    the file and the field): a count must be a positive integer, a head count divide its width."""
    for field in DEFAULTS[model_type]:
        kind = KINDS[field]
        if not CHECKS[kind](config[field]):
            raise UserError(f"{str(path)!r}: {field} is {config[field]!r}, it must be {kind}; correct the "
                             "field (or save the model again with transformers)")
    for width, parts in DIVIDES:
        if width in DEFAULTS[model_type] and config[width] % config[parts]:
            raise UserError(f"{str(path)!r}: {width} {config[width]} is not divisible by {parts} "
                             f"{config[parts]}; correct the fields")
    return config


def _read_weights(directory: Path) -> State:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_tensors(directory / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            shards = read_json(directory / index).get("weight_map")
            if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
                raise UserError(f"{str(directory / index)!r} has no weight_map of keys to shard files; "
                                 "restore it, or save the model again")
            return {k: v for shard in sorted(set(shards.values()))
                    for k, v in read_tensors(directory / shard).items()}
    raise UserError(f"{str(directory)!r} has a config.json but no model.safetensors or pytorch_model.bin")


def _vit_config(config: dict, state: State, model_type: str, arch: str, notes: list
                ) -> tuple[ViTConfig, list]:
    """The encoder's ViTConfig from config.json (and the stored tables)."""
    width, video, hidden = config["hidden_size"], model_type == "videomae", config["intermediate_size"]
    if int(width * (hidden / width)) != hidden:  # vitscale's MLP is int(width * mlp_ratio) wide
        raise UserError(f"intermediate_size {hidden} is not expressible as a ratio of hidden_size {width}")
    size, patch = config["image_size"], config["patch_size"]
    if not isinstance(patch, int):
        if len(set(patch)) != 1:
            raise UserError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    enc = "encoder." if arch.endswith("ForPreTraining") else ""
    fields = dict(
        image_size=size if isinstance(size, int) else tuple(size), patch_size=patch,
        in_chans=config["num_channels"], width=width, depth=config["num_hidden_layers"],
        heads=config["num_attention_heads"], mlp_ratio=hidden / width, norm_eps=config["layer_norm_eps"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)
    if not video:
        cfg = ViTConfig(**fields, qkv_bias=config["qkv_bias"])
        if model_type == "vit_mae" and f"{enc}pos_embed" in state:
            kind = classify_table(state[f"{enc}pos_embed"], width, cfg.grid, 1)
            cfg = cfg.replace(pos_embed=kind)
            notes.append(f"pos_embed: the stored table is {'MAE' if kind == 'sincos' else 'a'} {kind} table")
        return cfg, notes
    mean = config["use_mean_pooling"]
    if arch == "VideoMAEForVideoClassification" and not mean:
        raise UserError("VideoMAEForVideoClassification with use_mean_pooling=false pools the first patch "
                         "token, which vitscale does not")
    if arch == "VideoMAEForPreTraining" and mean:
        raise UserError("this VideoMAEForPreTraining has use_mean_pooling=true, so no norm between encoder "
                         "and decoder; vitscale's MAE always has one (published checkpoints set it false)")
    if arch == "VideoMAEForVideoClassification":
        notes.append(f"fc_norm: transformers uses eps {TORCH_LN_EPS:g} there, vitscale layer_norm_eps "
                     f"{fields['norm_eps']:g} for every norm (relative difference about 1e-5 / variance)")
    cfg = ViTConfig(**fields, frames=config["num_frames"], tubelet=config["tubelet_size"], class_token=False,
                    pool="mean", pos_embed="sincos1d", qkv_bias=config["qv_bias"])
    return cfg, notes


def _mae_config(config: dict, state: State, cfg: ViTConfig, video: bool, notes: list
                ) -> tuple[MAEConfig, list]:
    """The decoder and masking of a ViTMAE / VideoMAE pre-training model."""
    width, hidden = config["decoder_hidden_size"], config["decoder_intermediate_size"]
    if hidden != int(width * cfg.mlp_ratio):
        raise UserError(f"decoder_intermediate_size {hidden} is not the encoder's MLP ratio "
                         f"{cfg.mlp_ratio:g} x {width}; vitscale's decoder uses the encoder's ratio")
    fields = dict(decoder_width=width, decoder_depth=config["decoder_num_hidden_layers"],
                  decoder_heads=config["decoder_num_attention_heads"], norm_pix_loss=config["norm_pix_loss"])
    if video:
        state["decoder_embed.bias"] = torch.zeros(width)
        notes += ["decoder_embed bias set to zero (encoder_to_decoder has none: the same function)",
                  "masking: VideoMAE's tube masking at 0.9 (transformers takes the mask as an input)",
                  f"decoder norm: transformers uses eps {TORCH_LN_EPS:g}, vitscale layer_norm_eps",
                  "norm-pix target by channel, as VideoMAE; transformers builds it from the input taken back "
                  "to [0, 1] pixels, vitscale from the input as given (the same but for eps / std)"]
        return MAEConfig(mask_ratio=0.9, masking="tube", decoder_pos_embed="sincos1d", norm_pix_by="channel",
                         **fields), notes
    ratio = config["mask_ratio"]
    if int(cfg.num_patches * (1 - ratio)) != num_visible(cfg.num_patches, ratio):
        notes.append(f"mask_ratio {ratio:g}: transformers keeps {int(cfg.num_patches * (1 - ratio))} of "
                     f"{cfg.num_patches} tokens, vitscale {num_visible(cfg.num_patches, ratio)}")
    kind = classify_table(state["decoder_pos_embed"], width, cfg.grid, 1)
    if kind == "learned":
        raise UserError("the decoder's position table is not a fixed sin-cos table; vitscale's MAE decoder "
                         "computes a fixed one")
    return MAEConfig(mask_ratio=ratio, masking="random", decoder_pos_embed=kind, **fields), notes


# ----------------------------------------------------------------------------- export
def write(model, labels: tuple[str, ...] = ()) -> tuple[dict, State, list[str]]:
    """(config.json dict, state dict, notes) of a vitscale ViT or MAE in transformers' layout;
    `labels` name the head's classes in id2label / label2id (else transformers' LABEL_i)."""
    vit = model.encoder if isinstance(model, MAE) else model
    cfg = vit.cfg
    state = dict(model.state_dict())
    enc = "encoder." if isinstance(model, MAE) else ""
    notes = []
    if cfg.pos_embed != "learned":
        state[f"{enc}pos_embed"] = vit.pos_embed  # transformers' ViT and ViTMAE store the table
    common = dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                  intermediate_size=cfg.mlp_hidden, hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=cfg.norm_eps,
                  image_size=cfg.image_size if isinstance(cfg.image_size, int) else list(cfg.hw),
                  patch_size=cfg.patch_size, num_channels=cfg.in_chans)
    if cfg.num_classes:
        common |= id2label(labels if len(labels) == cfg.num_classes else
                           tuple(f"LABEL_{i}" for i in range(cfg.num_classes)))
    if cfg.is_video:
        model_type, config, arch, norm = _video_layout(model, cfg, state, enc, notes)
        config = common | config
    else:
        if not cfg.class_token:
            raise UserError("transformers' ViT and ViTMAE have a cls token; this model has none")
        if isinstance(model, MAE):
            if model.cfg.encoder_on_all_tokens:
                raise UserError("transformers' ViTMAE has no encoder mask token (encoder_on_all_tokens)")
            state["decoder_pos_embed"] = model.decoder_pos
            model_type, arch, norm = "vit_mae", "ViTMAEForPreTraining", "layernorm"
            config = common | _mae_fields(model.cfg, cfg) | dict(mask_ratio=model.cfg.mask_ratio,
                                                                  qkv_bias=cfg.qkv_bias)
            if model.cfg.masking != "random":
                notes.append("ViTMAE masks at random; this model's tube masking is not in the config")
        else:
            if cfg.pool != "cls":
                raise UserError("transformers' ViT pools the cls token; this model mean-pools (use timm)")
            model_type, norm = "vit", "layernorm"
            arch = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
            config = common | dict(qkv_bias=cfg.qkv_bias, encoder_stride=cfg.patch_size)
            if not cfg.num_classes:
                notes.append("ViTModel has a pooler this model lacks: load it with add_pooling_layer=False")
    state = split_qkv(state, qv_bias=model_type == "videomae")
    out, unmatched = rename(state, rules(pairs(model_type, arch, norm), reverse=True))
    assert not unmatched, unmatched  # every vitscale key has a transformers name
    if arch.endswith("Model"):  # a bare encoder is saved without its attribute prefix
        base = BASE[model_type] + "."
        out = {k[len(base):] if k.startswith(base) else k: v for k, v in out.items()}
    return {"architectures": [arch], "model_type": model_type} | config, out, notes


def id2label(names: tuple[str, ...]) -> dict:
    """transformers' id2label and label2id of class names in id order (label2id keeps the first id
    of a name given twice)."""
    ids = {}
    for i, name in enumerate(names):
        ids.setdefault(name, i)
    return dict(id2label={str(i): name for i, name in enumerate(names)}, label2id=ids)


def labels_of(config: dict, count: int) -> tuple[str, ...]:
    """The class names config.json's id2label gives a head of `count` classes, or () where it names
    none (or only transformers' LABEL_i)."""
    table = config.get("id2label")
    if not isinstance(table, dict) or not count:
        return ()
    names = tuple(table.get(str(i)) for i in range(count))
    if not all(isinstance(n, str) for n in names) or names == tuple(f"LABEL_{i}" for i in range(count)):
        return ()
    return names


def _video_layout(model, cfg: ViTConfig, state: State, enc: str, notes: list) -> tuple[str, dict, str, str]:
    """VideoMAE's config fields for a video model; drops what transformers computes itself."""
    if cfg.class_token:
        raise UserError("transformers' VideoMAE has no cls token; this model has one")
    table = state[f"{enc}pos_embed"]
    if cfg.pos_embed != "sincos1d" and not is_table(table, "sincos1d", cfg.width, cfg.grid, 0):
        raise UserError("transformers' VideoMAE computes a fixed sinusoid table; this model's position "
                         "table is another (export to timm, or train with --model.pos_embed=sincos1d)")
    del state[f"{enc}pos_embed"]
    config = dict(num_frames=cfg.frames, tubelet_size=cfg.tubelet, qv_bias=cfg.qkv_bias)
    if isinstance(model, MAE):
        if model.cfg.decoder_pos_embed != "sincos1d":
            raise UserError("transformers' VideoMAE decoder uses a sinusoid table: pre-train with "
                             "--mae.decoder_pos_embed=sincos1d to export there")
        if state.pop("decoder_embed.bias").abs().max() > 0:
            raise UserError("VideoMAE's encoder_to_decoder has no bias; this model's decoder_embed bias "
                             "is not zero")
        notes.append(f"decoder norm: transformers uses eps {TORCH_LN_EPS:g}, this model {cfg.norm_eps:g}")
        config |= _mae_fields(model.cfg, cfg) | dict(use_mean_pooling=False)
        return "videomae", config, "VideoMAEForPreTraining", "layernorm"
    if cfg.num_classes:
        if cfg.pool != "mean":
            raise UserError("transformers' VideoMAE classifier mean-pools; this model pools otherwise")
        notes.append(f"fc_norm: transformers uses eps {TORCH_LN_EPS:g}, this model {cfg.norm_eps:g}")
        return "videomae", config | dict(use_mean_pooling=True), "VideoMAEForVideoClassification", "fc_norm"
    return "videomae", config | dict(use_mean_pooling=False), "VideoMAEModel", "layernorm"


def _mae_fields(mae: MAEConfig, cfg: ViTConfig) -> dict:
    return dict(decoder_hidden_size=mae.decoder_width, decoder_num_hidden_layers=mae.decoder_depth,
                decoder_num_attention_heads=mae.decoder_heads, norm_pix_loss=mae.norm_pix_loss,
                decoder_intermediate_size=int(mae.decoder_width * cfg.mlp_ratio))

