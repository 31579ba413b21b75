"""The pieces of a vanilla transformer that need no ViTConfig: fixed and resampled position
tables, and the pre-norm block (attention, MLP, stochastic depth, activation checkpointing).

ViT's encoder and MAE's decoder are both built of these `Block`s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitscale.common.errors import UserError

Grid = tuple[int, int, int]  # (t, h, w) tokens along time, height, width


# ----------------------------------------------------------------------------- position embeddings
def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos embedding of positions. pos: [M] -> [M, dim] (dim even)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed(dim: int, grid: Grid) -> Tensor:
    """Fixed sin-cos embedding for a (t, h, w) grid -> [t*h*w, dim].

    Space is MAE's 2D form exactly as its released code computes it: the first half of the
    channels encodes the column, the second half the row (MAE's code names them the other
    way round; its pre-trained weights rely on this order). Time, when the grid has more
    than one step, adds a 1D sin-cos over all channels (a separable space + time embedding,
    as MViT's sep_pos_embed). dim must be a multiple of 4.
    """
    if dim % 4:
        raise UserError(f"sincos position embedding needs width divisible by 4, got {dim}")
    t, h, w = grid
    rows = sincos_1d(dim // 2, torch.arange(h).repeat_interleave(w))  # [h*w, D/2]
    cols = sincos_1d(dim // 2, torch.arange(w).repeat(h))  # [h*w, D/2]
    space = torch.cat([cols, rows], dim=1)  # [h*w, D]
    if t == 1:
        return space
    time = sincos_1d(dim, torch.arange(t))  # [t, D]
    return (time[:, None, :] + space[None]).reshape(t * h * w, dim)


def sincos1d_pos_embed(dim: int, grid: Grid) -> Tensor:
    """VideoMAE's fixed table for a (t, h, w) grid -> [t*h*w, dim] (dim even).

    One position per token in (t, h, w) order, as in "Attention Is All You Need": channel
    2i holds sin(n / 10000^(2i/dim)) and channel 2i+1 the matching cos.
    """
    if dim % 2:
        raise UserError(f"sincos1d position embedding needs an even width, got {dim}")
    n = grid[0] * grid[1] * grid[2]
    omega = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [D/2]
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]  # [N, D/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n, dim).float()  # interleaved


def fixed_pos_embed(kind: str, dim: int, grid: Grid) -> Tensor:
    """A fixed position table by name ("sincos" or "sincos1d") -> [t*h*w, dim]."""
    return sincos1d_pos_embed(dim, grid) if kind == "sincos1d" else sincos_pos_embed(dim, grid)


def resample_pos_embed(pos: Tensor, old: Grid, new: Grid) -> Tensor:
    """Interpolate a learned grid embedding to a new grid.

    pos: [1, t*h*w, D] -> [1, t'*h'*w', D]. Space is bicubic, time is linear; resampling to
    the same grid returns the same values.
    """
    if old == new:
        return pos
    (t, h, w), (t2, h2, w2), dim = old, new, pos.shape[-1]
    x = pos.reshape(t, h, w, dim).permute(0, 3, 1, 2).float()  # [t, D, h, w]
    if (h, w) != (h2, w2):
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False)  # [t, D, h2, w2]
    if t != t2:
        x = x.permute(2, 3, 1, 0).reshape(h2 * w2, dim, t)  # [h2*w2, D, t]
        x = F.interpolate(x, size=t2, mode="linear", align_corners=False)  # [h2*w2, D, t2]
        x = x.reshape(h2, w2, dim, t2).permute(3, 2, 0, 1)  # [t2, D, h2, w2]
    return x.permute(0, 2, 3, 1).reshape(1, t2 * h2 * w2, dim).to(pos.dtype)  # [1, N', D]



# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, scale: float | None = None):
        super().__init__()
        self.heads, self.scale = heads, scale  # logit scale; None = 1/sqrt(head dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cls_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: [B, L, D] -> [B, L, D]; with cls_attn also the first token's attention over
        the L tokens, averaged over heads, [B, L] (one extra q_cls @ k^T, no gradient)."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)  # [B, L, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, H, L, hd]
        out = self.proj(out.transpose(1, 2).reshape(B, L, D))
        if not cls_attn:
            return out
        with torch.no_grad():
            scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
            row = (q[:, :, :1] @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # [B, H, 1, L]
        return out, row.mean(dim=1)[:, 0]  # [B, L]


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch per sample with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + a * attn(norm(x)), then x + a * mlp(norm(x)).

    The branch multiplier a is 1 but under depth-muP (1/sqrt(depth / base depth)).
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, qkv_bias: bool, drop_path: float,
                 eps: float = 1e-6, attn_scale: float | None = None, branch_mult: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias, attn_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path, self.branch_mult = drop_path, branch_mult
        self.act_ckpt = False  # recompute this block's activations in backward (checkpoint_blocks)

    def branch(self, y: Tensor) -> Tensor:
        """A residual branch's output, scaled and dropped."""
        y = y * self.branch_mult if self.branch_mult != 1.0 else y
        return drop_path(y, self.drop_path, self.training)

    def forward(self, x: Tensor, cls_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: [B, L, D] -> [B, L, D]; with cls_attn also the cls attention row [B, L]."""
        if self.act_ckpt and torch.is_grad_enabled():
            # keeps only x for backward and runs the block again there; the RNG state (drop-path)
            # is saved and restored, so the recomputation draws what the forward drew
            return checkpoint(self._forward, x, cls_attn, use_reentrant=False)
        return self._forward(x, cls_attn)

    def _forward(self, x: Tensor, cls_attn: bool) -> Tensor | tuple[Tensor, Tensor]:
        if not cls_attn:
            x = x + self.branch(self.attn(self.norm1(x)))
            return x + self.branch(self.mlp(self.norm2(x)))
        y, row = self.attn(self.norm1(x), cls_attn=True)
        x = x + self.branch(y)
        return x + self.branch(self.mlp(self.norm2(x))), row


def checkpoint_blocks(module: nn.Module, on: bool = True) -> int:
    """Activation checkpointing of every transformer block in `module` (a ViT's, an MAE's
    encoder and decoder blocks): in training each keeps only its input and recomputes the rest
    in backward, trading about one more forward pass for the activations. Returns the count."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.act_ckpt = on
    return len(blocks)
