"""What the benchmark programs share: their common options, the environment line, JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitscale.common.io import atomic_write_text


def transformers():
    """The peer library, or one line saying how to install it."""
    try:
        import transformers as tf
    except ImportError as e:
        raise SystemExit("this benchmark needs transformers: pip install -e '.[test]'") from e
    return tf


def parser(doc: str) -> argparse.ArgumentParser:
    """Options every benchmark takes; each adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (smoke test)")
    p.add_argument("--rounds", type=int, help="alternating rounds per side (default: per cell)")
    p.add_argument("--json", type=Path, help="also write the cells as JSON to this path")
    p.add_argument("--seed", type=int, default=0)
    return p


def environment(device: torch.device) -> dict:
    """Versions, device and threads: printed at the top and stored in the JSON."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "transformers": transformers().__version__,
            "device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def environment_line(env: dict) -> str:
    return (f"torch {env['torch']}  transformers {env['transformers']}  device {env['device']} "
            f"({env['device_name']})  threads {env['threads']}")


def write_json(path: Path | None, obj: dict) -> None:
    """Write the results atomically (temporary file, fsync, rename) when --json named a path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")
