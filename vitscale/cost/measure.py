"""Measured cost: throughput, latency and peak memory of inference or a training step.

Warm-up steps, then the median of N timed steps; fp32, or bf16 or fp16 autocast (fp16 training
steps without a loss scale: the timing is the same); CPU or CUDA; eager or torch.compile'd (the
warm-up steps absorb the compilation, and their seconds are reported apart: warmup_s).
Peak memory is CUDA's max allocated bytes, or on CPU the process's resident-set high-water
mark (VmHWM, reset before the timed steps where Linux allows it).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitscale.common.device import autocast, pick_device
from vitscale.common.errors import UserError
from vitscale.models.layers import checkpoint_blocks
from vitscale.models.vit import ViT, ViTConfig


@dataclass(frozen=True)
class Measurement:
    mode: str  # "infer" or "train"
    batch: int
    dtype: str
    device: str
    samples_per_s: float
    ms_per_step: float  # median step latency
    peak_mem_mb: float
    warmup_s: float = 0.0  # seconds of the untimed warm-up steps (with torch.compile: mostly compiling)

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets VmHWM to the current RSS


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 1024)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int,
               iters: int) -> tuple[float, list[float]]:
    """(seconds of the `warmup` untimed calls of `step` together, seconds of each of `iters` calls after)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return warmup_s, times


def make_step(model: nn.Module, x: torch.Tensor, mode: str, device: torch.device, dtype: str,
              loss_fn: Callable[[object], torch.Tensor] | None = None) -> Callable[[], object]:
    """One inference step (no grad) or one training step (forward, backward, AdamW step).

    `loss_fn` turns the model's output into a scalar (default: the mean of a tensor
    output), so peer models with other output types can be timed the same way.
    """
    loss_fn = loss_fn or (lambda out: out.float().mean())
    if mode == "infer":
        model.eval()

        @torch.no_grad()
        def infer():
            with autocast(device, dtype):
                return model(x)

        return infer
    if mode != "train":
        raise UserError(f"mode must be 'infer' or 'train', got {mode!r}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one kernel: CPU and CUDA

    def train():
        with autocast(device, dtype):
            loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return train


def _check_counts(batch: int, warmup: int, iters: int) -> None:
    """A measurement needs samples and at least one timed step (warm-up may be none)."""
    for ok, message in [(batch >= 1, f"batch must be at least 1, got {batch}"),
                        (warmup >= 0, f"warmup must be 0 or more steps, got {warmup}"),
                        (iters >= 1, f"iters (timed steps) must be at least 1, got {iters}")]:
        if not ok:
            raise UserError(message)


def measure_model(model: nn.Module, x: torch.Tensor, mode: str = "train", dtype: str = "fp32",
                  warmup: int = 2, iters: int = 5, loss_fn=None) -> Measurement:
    """Measure any model on input `x` (already on its device)."""
    _check_counts(x.shape[0], warmup, iters)
    device = x.device
    step = make_step(model, x, mode, device, dtype, loss_fn)
    _reset_peak(device)
    warmup_s, times = time_steps(step, device, warmup, iters)
    ms = statistics.median(times) * 1000
    batch = x.shape[0]
    return Measurement(mode, batch, dtype, device.type, batch / (ms / 1000), ms, _peak_mb(device), warmup_s)


def held_for_backward(model: nn.Module, x: torch.Tensor, dtype: str = "fp32") -> int:
    """Bytes of activations one training forward pass of `model` on `x` keeps for backward: the
    storages autograd saves, and with checkpointed blocks (train.act_ckpt) each block's input,
    which the checkpoint holds to run it again; the model's own parameters are not counted.
    Measured from the tensors themselves, so it is the same on any device (peak memory is not:
    it adds gradients, optimizer state and the allocator's caching)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    hooks = [m.register_forward_pre_hook(lambda _, args: note(args[0])) for m in model.modules()
             if getattr(m, "act_ckpt", False)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x.device, dtype):
            model.train()(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(held.values())


def held(cfg: ViTConfig, batch: int = 8, dtype: str = "fp32", device: str = "auto", act_ckpt: bool = False,
         seed: int = 0) -> int:
    """held_for_backward of ViT(cfg) on random input of `batch` samples (act_ckpt: every block
    checkpointed)."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    model = ViT(cfg).to(dev)
    checkpoint_blocks(model, on=act_ckpt)
    return held_for_backward(model, example_input(cfg, batch, dev), dtype)


def example_input(cfg: ViTConfig, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random input of the config's shape: [B, C, H, W] or [B, C, T, H, W]."""
    shape = (cfg.in_chans, cfg.frames, *cfg.hw) if cfg.is_video else (cfg.in_chans, *cfg.hw)
    return torch.randn(batch, *shape, device=device)


def measure(cfg: ViTConfig, batch: int = 8, mode: str = "train", dtype: str = "fp32",
            device: str = "auto", warmup: int = 2, iters: int = 5, seed: int = 0,
            act_ckpt: bool = False, compile: bool = False) -> Measurement:
    """Build ViT(cfg) on a device and measure it on random input (with act_ckpt, every block
    checkpointed: train.act_ckpt; with compile, torch.compile'd as train.compile does, which
    the warm-up steps absorb)."""
    _check_counts(batch, warmup, iters)
    dev = pick_device(device)
    torch.manual_seed(seed)
    model = ViT(cfg).to(dev)
    checkpoint_blocks(model, on=act_ckpt)
    model = torch.compile(model) if compile else model
    return measure_model(model, example_input(cfg, batch, dev), mode, dtype, warmup, iters)
