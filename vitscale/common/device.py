"""Devices and dtypes by name: what a config or a flag may ask for, and what this machine has."""

from __future__ import annotations

import contextlib
import re

import torch

from vitscale.common.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,4})?")


def check_device(name: str, where: str = "device") -> str:
    """`name` if it is a device name vitscale knows (whether or not this machine has it)."""
    if not _DEVICE.fullmatch(name):
        raise UserError(f"{where} must be {DEVICES}, got {name[:40]!r}")
    return name


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; cpu, cuda, cuda:N or mps if this machine has it."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"{name} was asked for but this torch build sees no GPU; use --device cpu")
        if torch.device(name).index is not None and torch.device(name).index >= count:
            raise UserError(f"{name} was asked for but this machine has {count} GPU(s): "
                            f"cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("mps was asked for but this machine has no Apple GPU; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    """bf16 or fp16 autocast context on the device's type, or nothing for fp32 (fp16 training
    also needs a loss scale: vitscale.train.amp.Scaler)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])
