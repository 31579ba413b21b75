"""An exponential moving average (EMA) of a module's weights (`train.ema`).

    ema = EMA(module, decay=0.999)  # a frozen copy of the module, in eval mode
    ...; opt.step(); ema.update(module)  # ema_w = decay * ema_w + (1 - decay) * w, per parameter

The update is torch's own (torch.optim.swa_utils.get_ema_multi_avg_fn: one foreach lerp over
all parameters); with decay 0 it is an exact copy of the weights. Buffers are copied as they
are (a ViT's are fixed tables). The copy is a plain module on the same device: under DDP every
rank keeps its own, equal, since every rank's weights are; FSDP is refused (train.ema).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._lerp = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average toward `module`'s current weights (once per optimizer step)."""
        self._lerp(list(self.module.parameters()), [p.detach() for p in module.parameters()], None)
        for mine, theirs in zip(self.module.buffers(), module.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed as the module's own state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
