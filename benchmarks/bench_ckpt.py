"""What writing one checkpoint costs each FSDP rank: gathered whole on rank 0 (vitscale's
default) against each rank writing its own shards (train.sharded_ckpt).

A ViT preset with AdamW state (one step taken) is sharded over the ranks with FSDP2; each way
of saving is timed once, and each rank reports the state it holds for it (a full checkpoint:
the whole model and optimizer state, gathered onto rank 0's CPU; a sharded one: the rank's own
shards, the live tensors, nothing copied) and how far its peak RSS grew. Sharded is measured
first (a process's peak RSS only grows).

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_ckpt.py --model S/16
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_ckpt.py --model B/16 --out /tmp/ckpt

Runtime: a few seconds for S/16 on 2 CPU ranks (gloo).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from vitscale.common import checkpoint, dist
from vitscale.models.presets import preset
from vitscale.models.vit import ViT


def held(state: dict) -> int:
    """Bytes of this rank's part of the tensors in a (nested) state dict (a DTensor's local shard)."""
    return sum(held(v) if isinstance(v, dict) else (v.to_local() if hasattr(v, "to_local") else v).nbytes
               for v in state.values() if isinstance(v, dict) or torch.is_tensor(v))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="S/16", help="a ViT preset (vitscale models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="", help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    d = dist.setup(args.device)
    if not d.enabled:
        raise SystemExit("run it under torchrun --nproc_per_node N (N >= 2)")
    torch.manual_seed(0)
    model = ViT(preset(args.model)).to(d.device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-ckpt-"))
    out = Path(dist.broadcast_object(d, str(out)))  # rank 0's directory
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for kind in ("sharded", "full"):
        before = peak_mib()
        dist.barrier(d)
        t0 = time.perf_counter()
        sharded = kind == "sharded"
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=not sharded,
                                                                        cpu_offload=not sharded))
        state = {"step": 1, "best": None}
        mine = held(msd) + held(osd["state"]) if sharded or d.main else 0
        if sharded:
            checkpoint.save_sharded(out / kind, 1, msd, osd, state, d)
        elif d.main:
            checkpoint.save(out / kind, 1, msd, osd, state)
        dist.barrier(d)
        seconds = time.perf_counter() - t0
        del msd, osd
        said = dist.gather_object(d, f"{args.model} ({params:.1f} M params) on {d.world} ranks, {kind} "
                                     f"checkpoint: rank {d.rank} holds {mine / 2**20:.1f} MiB of state, "
                                     f"peak RSS +{peak_mib() - before:.1f} MiB, save {seconds:.2f} s")
        if said:  # rank 0
            print(*said, sep="\n", flush=True)
    if d.main and not args.out:
        shutil.rmtree(out)
    dist.teardown(d)


if __name__ == "__main__":
    main()
