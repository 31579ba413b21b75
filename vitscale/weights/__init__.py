"""Pre-trained weights in every common format, in and out.

    source = read("vit-mae-base/")                # what the checkpoint holds, renamed to vitscale's keys
    model, report = build(source, image_size=384) # a vitscale ViT (or MAE) of that shape, loaded and checked
    print(report.summary())                       # loaded, resampled, left out, kept at init, notes
    export(model, "out/", to="hf")                # or "timm", "vitscale"

Read (the format is told from the files and key names):
  hf        a transformers directory: config.json + model.safetensors / pytorch_model.bin; ViTModel,
            ViTForImageClassification, ViTMAEModel, ViTMAEForPreTraining, VideoMAEModel,
            VideoMAEForVideoClassification, VideoMAEForPreTraining (see hf.py)
  timm      a timm VisionTransformer state dict, .safetensors or .pth/.pt/.bin, bare or wrapped
            in model / module / state_dict, keys optionally prefixed module.
  mae       facebookresearch/mae checkpoints (pre-training with its decoder, or fine-tuned)
  videomae  MCG-NJU/VideoMAE checkpoints (pre-training, or fine-tuned)
  vitscale  a run directory (its best, else latest checkpoint), a `vitscale convert --to vitscale`
            directory, or a model.safetensors of vitscale's; a run or checkpoint directory of a run
            trained with train.ema gives its EMA weights (ema.safetensors; name RUN/best/model.safetensors
            for the raw ones); a sharded one (train.sharded_ckpt) is read whole from its shards/
Write: hf (a directory transformers' from_pretrained loads), timm (one .safetensors state dict;
an MAE in the original MAE layout, timm's plus decoder_*), vitscale (a directory).

Rules: a missing, unexpected or wrongly shaped key is an error that lists them all, unless
an fnmatch pattern allows it; nothing is zero-filled silently (a key bias absent from a
q_bias / v_bias layout is zero by construction and reported). Position tables are
resampled to the model's grid (fixed tables recomputed), and a fixed table the model
computes must equal the checkpoint's. torch files load with weights_only=True: a pickled
object other than tensors and containers is refused before any of its code can run; so is,
by key, a tensor that is not floating point (never cast) or holds NaN / Inf, and a config
(config.json, vitscale.json) whose fields are not what they must be or do not describe the
weights. Outputs are new files or directories, never overwritten, written whole or not at all.
State dicts record no attention head counts: they come from --heads, a --model preset (or
the run's model for --init), else the standard count for the width, reported as a note.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from vitscale.common import classnames, records, rundir
from vitscale.common.checkpoint import is_sharded, newest_good, read_shards
from vitscale.common.errors import UserError
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.presets import preset
from vitscale.models.vit import ViT, ViTConfig
from vitscale.weights import hf, timm
from vitscale.weights.core import (
    DECODER_KEYS,
    Report,
    Source,
    build,
    check_ndims,
    check_sizes,
    fixed_table,
    fold_mup,
    infer_config,
    load_into,
    size_of,
)
from vitscale.weights.files import publish, read_json, read_tensors, refuse_existing, some

FORMATS_OUT = ("hf", "timm", "vitscale")


def read(path: str | Path, *, like: ViTConfig | None = None, heads: int | None = None,
         decoder_heads: int | None = None, image_size=None, frames: int | None = None) -> Source:
    """Read a checkpoint of any supported format (told from its files and keys).

    Args:
        path: a directory (transformers, vitscale run or export) or a weights file.
        like: the model the weights are meant for: lends its heads and token grid where the
            checkpoint records neither.
        heads, decoder_heads: attention heads, for state dicts (which do not record them).
        image_size, frames: the checkpoint's input size, where it cannot be read from it.
    """
    p = Path(path)
    with naming(p):
        if p.is_dir():
            if (p / "config.json").is_file():
                return hf.read(p)
            if (p / "vitscale.json").is_file():
                return _export_dir(p)
            if (p / rundir.RUN).is_file():
                return _run_dir(p)
            if (p / "model.safetensors").is_file():  # a checkpoint directory of a run (ckpt-N/, best/)
                p = _weights_file(p)
            elif is_sharded(p):  # one of a run with train.sharded_ckpt: its shards read whole
                return _vitscale(read_shards(p), None, None, like=like, heads=heads, image_size=image_size,
                                 frames=frames)
            else:
                raise UserError(f"{str(p)!r} is neither a transformers directory (config.json), a vitscale "
                                 "export (vitscale.json), a run (config.yaml) nor a checkpoint "
                                 "(model.safetensors)")
        elif not p.is_file():
            raise UserError(f"weights {str(p)!r} not found; pass a run directory, a transformers model "
                             "directory, or a .safetensors / .pth file")
        tensors = read_tensors(p)
        hints = dict(like=like, heads=heads, image_size=image_size, frames=frames)
        if any(k.startswith(("vit.", "mae.")) for k in tensors) or \
                {"blocks.0.mlp.0.weight", "encoder.blocks.0.mlp.0.weight"} & set(tensors):
            return _noted(_vitscale(tensors, None, None, **hints), p)
        layout = timm.layout_of(tensors)
        if layout is not None:
            return timm.read(tensors, layout, decoder_heads=decoder_heads, **hints)
        if any("embeddings.patch_embeddings" in k for k in tensors):
            raise UserError(f"{str(p)!r} holds transformers weights; pass the directory with its config.json")
        raise UserError(f"{str(p)!r} is in no layout vitscale reads (keys such as {some(list(tensors), 4)})")


@contextmanager
def naming(path: Path):
    """Errors about the weights read from `path` name it (those that do not already)."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"weights {str(path)!r}: {e}") from None


def _export_dir(directory: Path) -> Source:
    """A `vitscale convert --to vitscale` directory: vitscale.json and model.safetensors."""
    path = directory / "vitscale.json"
    saved = read_json(path)
    try:
        if not isinstance(saved.get("model"), dict) or not isinstance(saved.get("mae") or {}, dict):
            raise UserError("it needs a 'model' object (and 'mae', null or an object)")
        cfg = records.from_dict(ViTConfig, saved["model"], "model.")
        mae = records.from_dict(MAEConfig, saved["mae"], "mae.") if saved.get("mae") else None
    except UserError as e:
        raise UserError(f"{str(path)!r}: {e}") from None
    source = _vitscale(read_tensors(directory / "model.safetensors"), cfg, mae, where=repr(str(path)))
    labels = saved.get("classes") or ()
    if not (isinstance(labels, list) and len(labels) == source.model.num_classes
            and all(isinstance(n, str) for n in labels)):
        labels = ()  # no names, or not the head's: its classes go by their ids
    return replace(source, labels=tuple(labels))


def _run_dir(run_dir: Path) -> Source:
    """A vitscale run: its best checkpoint, else its newest whole one (a damaged one passed over
    with a warning), with the run's config."""
    found = newest_good(run_dir, first=(run_dir / rundir.BEST,))
    if found is None:
        raise UserError(f"{str(run_dir)!r} holds no checkpoint to start from")
    path = _weights_file(found.path)
    tensors = found.model if found.sharded else read_tensors(path)  # shards: read whole by load
    model, mae = _run_shape(run_dir / rundir.RUN, decoder=any(k.startswith("mae.") for k in tensors))
    source = _vitscale(tensors, model, mae, where=repr(str(run_dir / rundir.RUN)))
    names, named = classnames.read(run_dir, source.model.num_classes)
    return _noted(replace(source, labels=names if named else ()), path)


def _run_shape(path: Path, decoder: bool) -> tuple[ViTConfig, MAEConfig | None]:
    """The model a run's config.yaml describes, and its MAE decoder where its weights hold one
    (a pre-training task's module keeps its MAE under `mae.`). Only these two sections are read:
    the weights need no more of the run than its shape."""
    data = records.read_mapping(path)
    try:
        model = records.from_dict(ViTConfig, data.get("model") or {}, "model.")
        mae = records.from_dict(MAEConfig, data.get("mae") or {}, "mae.") if decoder else None
    except UserError as e:
        raise UserError(f"config file {str(path)!r}: {e}") from None
    return model, mae


def _weights_file(ckpt: Path) -> Path:
    """A checkpoint's weights to start from: its EMA (train.ema) where it has one, else its model."""
    return ckpt / "ema.safetensors" if (ckpt / "ema.safetensors").is_file() else ckpt / "model.safetensors"


def _noted(source: Source, path: Path) -> Source:
    """Say so where the weights are a run's moving average (a checkpoint's ema.safetensors)."""
    if path.name != "ema.safetensors":
        return source
    return replace(source, notes=(*source.notes, f"the run's EMA weights ({path}; train.ema), not its raw "
                                  f"ones ({path.with_name('model.safetensors')})"))


def _vitscale(tensors, cfg: ViTConfig | None, mae: MAEConfig | None, *, like=None, heads=None,
              image_size=None, frames=None, where: str = "") -> Source:
    """vitscale's own keys: a task module's (`vit.` / `mae.`), or a bare ViT's or MAE's; `cfg` read
    from `where` (a file that must then describe them), else from the shapes."""
    unmapped, notes = [], []
    if any(k.startswith("mae.") for k in tensors):
        state = {k[len("mae."):]: v for k, v in tensors.items() if k.startswith("mae.")}
    elif any(k.startswith("vit.") for k in tensors):  # a linear probe's own norm and head sit beside vit.
        state = {k[len("vit."):]: v for k, v in tensors.items() if k.startswith("vit.")}
        unmapped = [k for k in tensors if not k.startswith("vit.")]
    else:
        state = dict(tensors)
    has_decoder = any(k.startswith("encoder.") for k in state)
    enc = "encoder." if has_decoder else ""
    encoder = {k[len(enc):]: v for k, v in state.items() if k.startswith(enc)}
    check_ndims(state)
    inferred = frozenset()
    if cfg is not None:
        (width, depth), (decoder_width, decoder_depth) = size_of(encoder), size_of(state, *DECODER_KEYS)
        check_sizes(where, [("model.width", cfg.width, width), ("model.depth", cfg.depth, depth)] + (
            [("mae.decoder_width", mae.decoder_width, decoder_width),
             ("mae.decoder_depth", mae.decoder_depth, decoder_depth)] if mae is not None else []))
    else:
        cfg, inferred, notes = infer_config(
            encoder, pool=like.pool if like else "cls", norm_eps=like.norm_eps if like else 1e-6,
            pos_embed=None if "pos_embed" in encoder else (like.pos_embed if like else "sincos"),
            grid_hint=like.grid if like else None, heads=heads or (like.heads if like else None),
            image_size=image_size, frames=frames)
        inferred |= {"heads"} if heads is None and like is not None else set()
        notes.append("no config with these weights: the architecture is read from their shapes")
    cfg = cfg.replace(num_classes=encoder["head.weight"].shape[0] if "head.weight" in encoder else 0)
    if has_decoder and mae is None:
        mae, more, decoder_notes = timm.decoder_config(state, cfg, "mae", None)
        inferred, notes = inferred | more, notes + decoder_notes
    if cfg.pos_embed != "learned":
        state[f"{enc}pos_embed"] = fixed_table(cfg.pos_embed, cfg.width, cfg.grid, cfg.num_prefix)
    return Source(format="vitscale", state=state, model=cfg, mae=mae if has_decoder else None,
                  unmapped=tuple(unmapped), head_extras=("norm.*", "head.*"), inferred=inferred,
                  notes=tuple(notes))


def load(path: str | Path, *, head: bool = True, allow: tuple[str, ...] = (), image_size=None,
         frames: int | None = None, num_classes: int | None = None, **read_args) -> tuple[nn.Module, Report]:
    """read + build: a loaded vitscale model (ViT, or MAE for a pre-training checkpoint) and its report."""
    source = read(path, image_size=image_size, frames=frames, **read_args)
    with naming(Path(path)):
        return build(source, image_size=image_size, frames=frames, num_classes=num_classes, head=head,
                     allow=allow)


def init_encoder(encoder: ViT, init: str | Path, allow: tuple[str, ...] = ()) -> Report:
    """Start a run's encoder from weights in any format (`--init`); its class head stays new."""
    source = read(init, like=encoder.cfg)
    with naming(Path(init)):
        return load_into(encoder, source, head=False, allow=allow)


def standard(model: nn.Module) -> nn.Module:
    """A ViT or MAE with its encoder's muP multipliers folded into the weights: the same function
    under the standard parametrisation (the model itself if it is SP)."""
    is_mae = isinstance(model, MAE)
    cfg = model.encoder.cfg if is_mae else model.cfg
    state, sp = fold_mup(model.state_dict(), cfg, "encoder." if is_mae else "")
    if sp is cfg:
        return model
    folded = MAE(sp, model.cfg) if is_mae else ViT(sp)
    folded.load_state_dict(state)
    return folded.to(next(model.parameters()).device).train(model.training)


def export(model: nn.Module, out: str | Path, to: str,
           labels: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    """Write a ViT or MAE in a format ("hf", "timm", "vitscale") as a new file or directory `out`;
    returns (files written, notes). An existing output is refused, never overwritten; the files
    appear all at once (see files.publish). `labels` name the head's classes (hf: id2label;
    vitscale: vitscale.json's "classes"; timm keeps none).

    hf and timm have no muP multipliers: a muP model is written with them folded into its
    weights (`standard`), which computes the same; vitscale keeps them in its config.
    """
    final, directory = _output(out, to)
    refuse_existing(final, directory)
    notes = []
    sp = standard(model) if to in ("hf", "timm") else model
    if sp is not model:
        model = sp
        notes.append("muP multipliers folded into the weights (hf / timm models are standard-parametrised)")
    if to == "hf":
        config, state, written = hf.write(model, labels)
        notes += written
        return publish(final, {"model.safetensors": state, "config.json": _json(config)}, directory), notes
    if to == "timm":
        return publish(final, {final.name: timm.write_state(model)}, directory), notes
    is_mae = isinstance(model, MAE)
    prefix, cfg = ("mae.", model.encoder.cfg) if is_mae else ("vit.", model.cfg)
    saved = {"format": "vitscale", "model": asdict(cfg), "mae": asdict(model.cfg) if is_mae else None,
             "classes": list(labels) if labels and len(labels) == cfg.num_classes else None}
    state = {prefix + k: v for k, v in model.state_dict().items()}
    return publish(final, {"model.safetensors": state, "vitscale.json": _json(saved)}, directory), notes


def _output(out: str | Path, to: str) -> tuple[Path, bool]:
    """(the file or directory a format writes at `out`, whether a directory)."""
    if to not in FORMATS_OUT:
        raise UserError(f"unknown output format {to!r}; use one of {', '.join(FORMATS_OUT)}")
    out = Path(out)
    if to == "timm":
        return (out if out.suffix == ".safetensors" else out / "model.safetensors"), False
    return out, True


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def convert(src: str | Path, to: str, out: str | Path, *, model: str | None = None, heads: int | None = None,
            decoder_heads: int | None = None, image_size=None, frames: int | None = None,
            num_classes: int | None = None, head: bool = True,
            allow: tuple[str, ...] = ()) -> tuple[Report, list[Path]]:
    """Read any format, build and check a vitscale model, write it in another (`vitscale convert`).

    `model` (a preset name) lends heads and input size where the checkpoint records neither;
    `image_size` / `frames` resample to a new input size; `num_classes` gives a new head.
    """
    refuse_existing(*_output(out, to))  # before the work, not after it
    sides = (image_size,) if isinstance(image_size, int) else image_size or ()
    sizes = [("--heads", heads, 1), ("--decoder-heads", decoder_heads, 1), ("--frames", frames, 1),
             ("--num-classes", num_classes, 0)] + [("--image-size", side, 1) for side in sides]
    for flag, value, least in sizes:
        if value is not None and value < least:
            raise UserError(f"{flag} must be {'positive' if least else '0 (no head) or more'}, got {value}")
    source = read(src, like=preset(model) if model else None, heads=heads, decoder_heads=decoder_heads,
                  image_size=image_size, frames=frames)
    with naming(Path(src)):
        built, report = build(source, image_size=image_size, frames=frames, num_classes=num_classes,
                              head=head, allow=allow)
    same_head = head and num_classes is None and isinstance(built, ViT) and \
        built.cfg.num_classes == len(source.labels)
    paths, notes = export(built, out, to, source.labels if same_head else ())
    return replace(report, notes=report.notes + tuple(notes)), paths


__all__ = ["FORMATS_OUT", "Report", "Source", "build", "convert", "export", "fold_mup", "init_encoder",
           "load", "load_into", "read", "standard"]
