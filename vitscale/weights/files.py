"""Reading and writing weight files safely, and renaming their keys.

Weights load from safetensors, or through `torch.load(weights_only=True)`, which refuses any
pickled object that is not a tensor or a plain container before it can run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from vitscale.common.compat import COMPILED_PREFIX
from vitscale.common.errors import UserError
from vitscale.common.io import fsync

State = dict[str, Tensor]
WRAPPERS = ("model", "module", "state_dict")  # training scripts nest the weights under these
PREFIXES = ("module.", COMPILED_PREFIX)  # DistributedDataParallel and torch.compile key prefixes


def read_tensors(path: Path) -> State:
    """Every tensor of a .safetensors file, or of a torch checkpoint unwrapped to its state dict,
    each checked to be a finite floating-point tensor (`checked`)."""
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {str(path)!r} as safetensors ({e}); the file is damaged or "
                             "cut short: copy or export it again") from None
        if not state:
            raise UserError(f"{str(path)!r} holds no tensors")
        return checked(state, str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e):  # not a pickle at all
            raise UserError(f"{str(path)!r} is not a torch checkpoint (a zip or pickle file); if it is a "
                             "safetensors file, name it .safetensors") from None
        raise UserError(
            f"{str(path)!r} holds pickled Python objects besides tensors, and vitscale runs no code from a "
            "checkpoint; if you trust its source, re-save just its state dict (e.g. with safetensors' "
            "save_file) and pass that file") from None
    except Exception as e:  # whatever torch.load raises, given bytes that are no checkpoint, is the file's
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read {str(path)!r} as a torch checkpoint ({type(e).__name__}: {first}); "
                         "the file is damaged, cut short or not a checkpoint") from None
    return checked(unwrap(obj, str(path)), str(path))


def checked(state: State, where: str) -> State:
    """`state` itself, once every tensor is floating point and finite.

    Integer, bool and complex tensors would be cast on loading (int8 weights mostly to
    nothing useful), and a NaN or Inf would surface as a non-finite loss blamed on the
    learning rate: both are refused here, naming the keys.
    """
    odd = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
           if not v.is_floating_point()]
    if odd:
        raise UserError(f"{where!r} holds tensors that are not floating point: {some(odd)}; vitscale does "
                         "not cast weights: pass the checkpoint's float (dequantized) weights")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{where!r} has NaN or infinite values in {some(bad)}; the weights are damaged (or "
                         "were saved after training diverged): use an earlier checkpoint")
    return state


def some(items: list[str], n: int = 3) -> str:
    """'a, b, c and 4 more': the first n items and a count of the rest."""
    head = ", ".join(items[:n])
    return f"{head} and {len(items) - n} more" if len(items) > n else head


def read_json(path: Path) -> dict:
    """A JSON object from a file, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} not found") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{str(path)!r} is not valid JSON ({str(e).splitlines()[0]}); restore the file or "
                         "export the model again") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object of fields")
    return data


def unwrap(obj, where: str) -> State:
    """Descend through `model` / `module` / `state_dict` wrappers and strip DDP / compile prefixes."""
    while isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            others = ", ".join(str(k) for k, v in obj.items() if not torch.is_tensor(v))
            raise UserError(f"{where!r} is not a state dict of tensors ({others[:80]} are not tensors, "
                             f"and it has none of {', '.join(WRAPPERS)} holding one)")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{where!r} holds no tensors")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def refuse_existing(final: Path, directory: bool) -> None:
    """An output must be new: converting never overwrites (an empty directory may be filled)."""
    if final.exists() and not (directory and final.is_dir() and not any(final.iterdir())):
        raise UserError(f"{str(final)!r} exists; remove it or choose another path")


def publish(final: Path, files: dict[str, State | str], directory: bool) -> list[Path]:
    """Write `files` (name -> tensors, or text) as a new directory `final`, or with `directory`
    False the one file as `final` itself; returns the paths written.

    Everything is written into a temporary directory beside `final`, fsynced, then renamed
    into place, so a failure (a full disk, a kill) never leaves half an output behind.
    """
    refuse_existing(final, directory)
    stage = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        stage.mkdir(parents=True)
        for name, content in files.items():
            if isinstance(content, str):
                (stage / name).write_text(content)
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(stage / name))
            fsync(stage / name)
        fsync(stage)
        os.replace(stage if directory else stage / next(iter(files)), final)
        fsync(final.parent)
    except OSError as e:
        raise UserError(f"cannot write {str(final)!r}: {e.strerror or e}; choose another path") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [final / name for name in files] if directory else [final]


# ----------------------------------------------------------------------------- key renaming
Rules = list[tuple[re.Pattern, str]]


def rules(pairs: list[tuple[str, str]], reverse: bool = False) -> Rules:
    """Compile (source, target) name prefixes, `{i}` standing for a block index, into rules.

    A prefix matches whole dotted components: ("vit.layernorm", "norm") renames
    `vit.layernorm.weight` but not `vit.layernorm_after.weight`. `reverse` swaps the pairs.
    """
    compiled = []
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        pattern = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + r"(?=\.|$)")
        compiled.append((pattern, dst.replace("{i}", r"\1")))
    return compiled


def rename(state: State, table: Rules) -> tuple[State, list[str]]:
    """Rename every key by the first rule that matches; return (renamed, keys no rule matched)."""
    out, origin, unmatched = {}, {}, []
    for key, value in state.items():
        for pattern, target in table:
            if pattern.match(key):
                name = pattern.sub(target, key, count=1)
                if name in out:
                    raise UserError(f"both {origin[name]} and {key} would load into {name}; the checkpoint "
                                     "mixes two layouts")
                out[name], origin[name] = value, key
                break
        else:
            unmatched.append(key)
    return out, unmatched


def fuse_qkv(state: State) -> tuple[State, list[str]]:
    """Fuse separate query / key / value projections into vitscale's `attn.qkv`.

    `X.attn.q.weight`, `X.attn.k.weight`, `X.attn.v.weight` [D, D] -> `X.attn.qkv.weight` [3D, D];
    biases likewise. A layout with a query and a value bias and no key bias (`q_bias`,
    `v_bias`: BEiT, VideoMAE) has a key bias of zero, so the fused bias is
    cat(q_bias, zeros, v_bias) [3D]. Returns the state and a note if any bias was so filled.
    """
    out, zero_filled = dict(state), 0
    for p in sorted({k[: -len(".attn.q.weight")] for k in state if k.endswith(".attn.q.weight")}):
        parts = [out.pop(f"{p}.attn.{n}.weight", None) for n in "qkv"]
        if any(t is None or t.shape != parts[0].shape for t in parts):
            raise UserError(f"{p}.attn: the query, key and value weights have shapes "
                             f"{', '.join(str(None if t is None else tuple(t.shape)) for t in parts)}; they "
                             "must be three of one shape")
        out[f"{p}.attn.qkv.weight"] = torch.cat(parts)  # [3D, D]
    q_biases = {k[: -len(".attn.q.bias")] for k in state if k.endswith(".attn.q.bias")}
    q_biases |= {k[: -len(".attn.q_bias")] for k in state if k.endswith(".attn.q_bias")}
    for p in sorted(q_biases):
        q = out.pop(f"{p}.attn.q.bias", None)
        q = out.pop(f"{p}.attn.q_bias") if q is None else q
        v = out.pop(f"{p}.attn.v.bias", None)
        v = out.pop(f"{p}.attn.v_bias", None) if v is None else v
        if v is None:
            continue  # a query bias alone: leave it, to be reported as unexpected
        k = out.pop(f"{p}.attn.k.bias", None)
        zero_filled += k is None
        out[f"{p}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q) if k is None else k, v])  # [3D]
    notes = [f"key bias set to zero in {zero_filled} attention layers (the source has query and value "
             "biases only: the same function)"] if zero_filled else []
    return out, notes


def split_qkv(state: State, qv_bias: bool = False) -> State:
    """Inverse of `fuse_qkv`: `X.attn.qkv.*` -> `X.attn.q/k/v.*`, or with qv_bias `X.attn.q_bias`
    and `X.attn.v_bias` (the key bias must then be zero, or the layout cannot hold it)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".attn.qkv.weight"):
            p = key[: -len(".attn.qkv.weight")]
            for n, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{p}.attn.{n}.weight"] = part
        elif key.endswith(".attn.qkv.bias"):
            p = key[: -len(".attn.qkv.bias")]
            q, k, v = value.chunk(3)
            if not qv_bias:
                out.update({f"{p}.attn.q.bias": q, f"{p}.attn.k.bias": k, f"{p}.attn.v.bias": v})
            elif k.abs().max() > 0:
                raise UserError(f"{p}: the key bias is not zero, and this layout has query and value "
                                 "biases only; export to another format")
            else:
                out.update({f"{p}.attn.q_bias": q, f"{p}.attn.v_bias": v})
        else:
            out[key] = value
    return out
