"""Tables for people (rich) and plain records for programs (JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from vitscale.cost.complexity import Cost
from vitscale.models.vit import ViTConfig


def console() -> Console:
    """A console that does not squeeze wide tables when output goes to a file or pipe."""
    return Console(width=None if sys.stdout.isatty() else 160)


def shape(cfg: ViTConfig) -> dict:
    """The fields that tell scaled configs apart."""
    h, w = cfg.hw
    return {"depth": cfg.depth, "width": cfg.width, "heads": cfg.heads,
            "image_size": f"{h}" if h == w else f"{h}x{w}", "frames": cfg.frames}


def cost_record(cfg: ViTConfig, c: Cost) -> dict:
    """One row: shape, tokens and cost in plain units."""
    return shape(cfg) | {"patch": cfg.patch_size, "tokens": cfg.num_patches + cfg.num_prefix,
                         "params": c.params, "flops": c.flops, "acts": c.acts}


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


COLUMNS = {  # record key -> (header, formatter)
    "name": ("model", str),
    "strategy": ("strategy", str),
    "target": ("target x", lambda v: f"{v:g}"),
    "achieved": ("achieved x", lambda v: f"{v:.3f}"),
    "depth": ("depth", str),
    "width": ("width", str),
    "heads": ("heads", str),
    "image_size": ("res", str),
    "frames": ("frames", str),
    "patch": ("patch", str),
    "tokens": ("tokens", str),
    "params": ("params (M)", lambda v: f"{v / 1e6:.2f}"),
    "flops": ("GFLOPs", lambda v: f"{v / 1e9:.3f}"),
    "acts": ("acts (M)", lambda v: f"{v / 1e6:.2f}"),
    "samples_per_s": ("samples/s", lambda v: f"{v:.1f}"),
    "ms_per_step": ("ms/step", lambda v: f"{v:.1f}"),
    "peak_mem_mb": ("peak MB", lambda v: f"{v:.0f}"),
    "warmup_s": ("warm-up s", lambda v: f"{v:.1f}"),
    "mode": ("mode", str),
    "dtype": ("dtype", str),
    "batch": ("batch", str),
    "act_ckpt": ("act ckpt", lambda v: "yes" if v else "no"),
    "mfu": ("MFU", lambda v: "-" if v is None else f"{100 * v:.1f}%"),
}


def table(title: str, records: Sequence[dict], keys: Sequence[str]) -> Table:
    """A rich table of the given record keys (GFLOPs are multiply-adds)."""
    t = Table(title=title, title_justify="left")
    for k in keys:
        t.add_column(COLUMNS[k][0], justify="left" if k in ("name", "strategy", "mode", "dtype") else "right")
    for r in records:
        t.add_row(*(COLUMNS[k][1](r[k]) if r.get(k) is not None else "-" for k in keys))
    return t
