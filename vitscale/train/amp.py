"""fp16's dynamic loss scale around the optimizer step (torch.amp.GradScaler); nothing for fp32 / bf16.

float16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero. The scaler multiplies the
loss by S (65536 at first) before backward, divides the gradients by S before clipping and the
update, and skips an update whose gradients hold an inf or NaN, halving S; after 2000 steps
without one it doubles S. bf16 has float32's exponent range and needs none of this.

A skipped step is not an error: its forward loss was finite, only the scaled backward overflowed.
A non-finite *loss* is (the forward overflowed, which no scale mends): the engine stops on it.
So does a scale that falls below MIN_SCALE: every step skipped for ~17 steps in a row from
65536 means the gradients are not finite at any scale, and training would silently stand still
(`broken`).
"""

from __future__ import annotations

import warnings

import torch

from vitscale.common import compat

MIN_SCALE = 1.0  # below it the unscaled gradients themselves overflow float16: a broken run


class Scaler:
    """Backward and optimizer step under train.dtype: scaled for fp16, plain otherwise."""

    init_scale = 2.0**16  # GradScaler's default; tests set another

    def __init__(self, dtype: str, device: torch.device, sharded: bool = False):
        """`sharded`: the gradients are FSDP shards; an overflow found on any rank's shard then
        skips the step on every rank (ShardedGradScaler all-reduces it)."""
        self.enabled, self.sharded = dtype == "fp16", sharded
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            # process_group None: the default group of now. Its default argument is the group that
            # stood when torch imported the module, gone in a process that has held another since
            # (a worker reused for a second run)
            self.scaler = ShardedGradScaler(device.type, init_scale=self.init_scale, enabled=self.enabled,
                                            process_group=None)
        else:
            self.scaler = torch.amp.GradScaler(device.type, init_scale=self.init_scale, enabled=self.enabled)
        self.skipped = 0  # updates skipped for overflowing gradients, since the run (re)started

    def backward(self, loss: torch.Tensor) -> None:
        """backward() of `loss`, times the loss scale for fp16."""
        self.scaler.scale(loss).backward()

    def step(self, opt: torch.optim.Optimizer, params, clip_grad: float = 0.0) -> bool:
        """Unscale the gradients, clip them to norm `clip_grad` (0 = off), step `opt` unless they
        overflowed, update the scale; True if the weights were updated."""
        if not self.enabled:
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            opt.step()
            return True
        with warnings.catch_warnings():  # FSDP2: its found-inf flag taken as a replicated DTensor, as meant
            warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
            self.scaler.unscale_(opt)  # the gradients' true values, so clip_grad means what it says
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)  # with an inf: NaNs, and a skip anyway
        if self.sharded:  # fused AdamW's own skip test fails on FSDP2's DTensor state
            compat.let_scaler_check_inf(opt)
        before = self.scaler.get_scale()
        self.scaler.step(opt)  # skipped when unscale_ found an inf or NaN
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before  # the scale falls only on a skipped step
        self.skipped += not stepped
        return stepped

    @property
    def broken(self) -> bool:
        """The scale has fallen below MIN_SCALE: the gradients overflow at any scale."""
        return self.enabled and self.scale < MIN_SCALE

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when off)."""
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict | None:
        """JSON-able state (scale, growth tracker, factors) for a checkpoint; None when off."""
        return self.scaler.state_dict() if self.enabled else None

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
