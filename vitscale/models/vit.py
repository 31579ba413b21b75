"""One vanilla Vision Transformer for images and video.

References:
  ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (pre-norm blocks, cls token).
  ViViT / VideoMAE: Arnab et al. 2021, Tong et al. 2022 (3D tubelet embedding, joint
  space-time attention over all tokens).
  MAE: He et al. 2022 (2D sin-cos position embedding, encoder on visible tokens only).
  EViT: Liang et al. 2022, "Not All Patches are What You Need" (keep the patch tokens the cls
  token attends to most); EVAD: Chen et al. 2023 (video: keep every token of the keyframe).
  muP: Yang et al. 2022, "Tensor Programs V" (Adam rules, Tables 3 and 8: hidden matrices'
  init variance and LR scale 1/width, the readout output 1/width, attention logits 1/d);
  depth-muP: Yang et al. 2023, "Tensor Programs VI" (residual branches x 1/sqrt(depth); its
  Adam LR factor 1/sqrt(depth) did not transfer here, see DEPTH_LR_EXPONENT).

An image is a clip of one frame: with frames=1 the patch embedding is a Conv2d and the
position grid is (1, H/p, W/p); with frames>1 it is a Conv3d with a temporal stride of
`tubelet` and the grid is (T/tubelet, H/p, W/p). Everything after the embedding is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.models.layers import Block, Grid, fixed_pos_embed, resample_pos_embed

POS_EMBEDS = ("learned", "sincos", "sincos1d")
PARAMS = ("sp", "mup")
INIT_STD = 0.02  # std of truncated-normal linears (timm / DeiT), the cls token, a learned position table
HEAD_INIT_STD = 2e-5  # a fine-tuned model's new class head (MAE's fine-tuning recipe)
# How ViT draws its linears: "trunc_normal" N(0, 0.02) (timm / DeiT, supervised), or "xavier"
# uniform on every linear (MAE's and VideoMAE's pre-training encoders; MAE.__init__ asks for it).
LINEAR_INITS = ("trunc_normal", "xavier")
# Token dropping (cfg.drop_by): which patch tokens survive after block cfg.drop_after.
#   "attention": the highest cls attention in that block, averaged over heads (EViT, train and eval);
#   "random": a uniform random subset per sample in training, an evenly spaced fixed subset at eval;
#   "keyframe": video only, every token of the middle frame, then the highest cls attention (EVAD).
DROP_BY = ("attention", "random", "keyframe")
# Hidden matrices' Adam LR x depth_mult^-this, beside the branches' 1/sqrt(depth_mult). Tensor
# Programs VI's Adam rule is 0.5; measured here (benchmarks/bench_transfer.py, digits, 200 steps,
# 4x depth) 0.5 moved the best LR 2.0x and 0 moved it 0.92x, so the branch multiplier alone.
DEPTH_LR_EXPONENT = 0.0


@dataclass(frozen=True)
class ViTConfig:
    image_size: int | tuple[int, int] = 224  # input height and width in pixels (N, or HxW)
    patch_size: int = 16  # side of a square patch in pixels: one token per patch (per tubelet of frames)
    frames: int = 1  # input frames: 1 = an image model, more = a video model
    tubelet: int = 1  # frames per token (the temporal patch size); must divide frames
    in_chans: int = 3  # input channels
    width: int = 768  # token dimension D
    depth: int = 12  # transformer blocks
    heads: int = 12  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden size as a multiple of width: int(width x mlp_ratio)
    num_classes: int = 1000  # classifier outputs; 0 = features only, no head (the data sets it for a run)

    # what the head reads: "cls", the class token, or "mean" of the patch tokens (the final norm then
    # follows the mean)
    pool: str = "cls"
    class_token: bool = True  # prepend a learned class token (pool="cls" needs it)

    # position embedding: "learned", or a fixed table with nothing to learn: "sincos" (MAE's 2-D
    # rows and columns, plus time for video) or "sincos1d" (VideoMAE's, over the flattened tokens)
    pos_embed: str = "learned"
    qkv_bias: bool = True  # bias on the fused query / key / value projection
    drop_path: float = 0.0  # stochastic depth: the last block's rate, rising linearly from 0 at the first
    norm_eps: float = 1e-6  # LayerNorm epsilon (timm and MAE use 1e-6; Hugging Face's ViT 1e-12)

    # parametrisation: "sp" (standard) or "mup" (muP with depth-muP, relative to base_*): under muP
    # the best learning rate holds as width and depth grow, so one swept on a small model transfers
    param: str = "sp"
    base_width: int = 0  # muP: the width the multipliers are relative to (0 = this model's: ratio 1)
    base_depth: int = 0  # muP: the depth the residual branches are relative to (0 = this model's)
    base_head_dim: int = 0  # muP: the head size the attention scale is relative to (0 = this model's)

    # token dropping: the blocks that see every token before the drop (0 = no drop); later blocks
    # see only the kept share, for less compute
    drop_after: int = 0
    keep: float = 1.0  # token dropping: the share of patch tokens kept after block drop_after (cls always)

    # which tokens are kept: "attention" (those the class token attends to most, EViT), "random" (an
    # evenly spaced subset at eval), or "keyframe" (video: the middle frame's, then by attention, EVAD)
    drop_by: str = "attention"

    def __post_init__(self) -> None:
        h, w = self.hw
        sizes = [  # first, so that the checks after them can divide
            (self.patch_size >= 1, f"patch size must be positive, got {self.patch_size}"),
            (min(h, w) >= self.patch_size,
             f"image size {h}x{w} must be at least the patch size {self.patch_size}"),
            (min(self.heads, self.in_chans, self.depth, self.width) >= 1,
             "depth, width, heads and in_chans must be positive"),
            (self.num_classes >= 0, f"num_classes must be 0 (no head) or more, got {self.num_classes}"),
            (self.width * self.mlp_ratio >= 1, f"mlp_ratio must be positive, got {self.mlp_ratio}"),
            (self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}"),
        ]
        for ok, message in sizes:
            if not ok:
                raise UserError(message)
        checks = [
            (h % self.patch_size == 0 and w % self.patch_size == 0,
             f"image size {h}x{w} is not divisible by the patch size {self.patch_size}"),
            (self.frames >= 1 and self.tubelet >= 1 and self.frames % self.tubelet == 0,
             f"frames ({self.frames}) must be a positive multiple of tubelet ({self.tubelet})"),
            (self.width % self.heads == 0,
             f"width {self.width} is not divisible by heads {self.heads}"),
            (self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}"),
            (self.pool != "cls" or self.class_token, "pool='cls' needs class_token=True"),
            (self.pos_embed in POS_EMBEDS,
             f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.pos_embed!r}"),
            (0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1)"),
            (self.param in PARAMS, f"param must be 'sp' or 'mup', got {self.param!r}"),
            (min(self.base_width, self.base_depth, self.base_head_dim) >= 0,
             "base_width, base_depth and base_head_dim must be >= 0 (0 = this model's own)"),
            (0.0 < self.keep <= 1.0, f"keep must be in (0, 1], got {self.keep}"),
            (0 <= self.drop_after < self.depth,
             f"drop_after must be in [0, depth={self.depth}), got {self.drop_after}"),
            (self.keep == 1.0 or self.drop_after >= 1,
             "keep < 1 needs drop_after >= 1: the number of blocks that see every token"),
            (self.drop_by in DROP_BY, f"drop_by must be one of {', '.join(DROP_BY)}, got {self.drop_by!r}"),
            (not self.drops or self.drop_by == "random" or self.class_token,
             f"drop_by={self.drop_by!r} ranks tokens by cls attention: set class_token=True or random"),
            (not self.drops or self.drop_by != "keyframe" or self.is_video,
             "drop_by='keyframe' is for video (frames > 1); use 'attention' for images"),
            (not self.drops or self.drop_by != "keyframe"
             or self.kept(self.num_patches) >= self.num_patches // max(1, self.grid[0]),
             f"keep={self.keep} keeps fewer tokens than one frame has; drop_by='keyframe' needs "
             f"keep >= {self.tubelet / self.frames:g}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def hw(self) -> tuple[int, int]:
        """Input (height, width) in pixels."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> Grid:
        """Token grid (t, h, w)."""
        h, w = self.hw
        return self.frames // self.tubelet, h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens (the cls token, if any)."""
        return int(self.class_token)

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    @property
    def patch_dim(self) -> int:
        """Input values per token: in_chans * tubelet * patch * patch."""
        return self.in_chans * self.tubelet * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    # muP multipliers: all exactly 1 under "sp", and under "mup" at the base shape.
    @property
    def width_mult(self) -> float:
        """Width over the base width (muP), else 1."""
        return self.width / (self.base_width or self.width) if self.param == "mup" else 1.0

    @property
    def depth_mult(self) -> float:
        """Depth over the base depth (depth-muP), else 1."""
        return self.depth / (self.base_depth or self.depth) if self.param == "mup" else 1.0

    @property
    def attn_scale(self) -> float | None:
        """Attention logit scale: None (SDPA's 1/sqrt(hd)) under SP; muP's sqrt(base_hd)/hd,
        written as 1/sqrt(hd) x sqrt(base_hd/hd) so that at the base it is SP's bit for bit."""
        if self.param != "mup":
            return None
        hd = self.head_dim
        return 1.0 / math.sqrt(hd) * math.sqrt((self.base_head_dim or hd) / hd)

    @property
    def branch_mult(self) -> float:
        """Residual branch multiplier 1/sqrt(depth_mult) (depth-muP)."""
        return 1.0 / math.sqrt(self.depth_mult)

    @property
    def readout_mult(self) -> float:
        """Class-head input multiplier 1/width_mult (muP's MuReadout)."""
        return 1.0 / self.width_mult

    @property
    def hidden_std(self) -> float:
        """Init std of hidden matrices: SP's 0.02, x 1/sqrt(width_mult) under muP (variance ~ 1/fan_in)."""
        return INIT_STD / math.sqrt(self.width_mult)

    @property
    def drops(self) -> bool:
        """Whether tokens are dropped (keep < 1 after block drop_after)."""
        return self.keep < 1.0 and self.drop_after >= 1

    def kept(self, n: int) -> int:
        """Patch tokens kept of n after the drop: round(keep * n), at least 1."""
        return max(1, round(self.keep * n)) if self.drops else n

    def replace(self, **changes) -> ViTConfig:
        return replace(self, **changes)


# ----------------------------------------------------------------------------- patch embedding
class PatchEmbed(nn.Module):
    """Non-overlapping patches (2D) or tubelets (3D) to tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        p = cfg.patch_size
        if cfg.is_video:
            kernel = (cfg.tubelet, p, p)
            self.proj = nn.Conv3d(cfg.in_chans, cfg.width, kernel, stride=kernel)
        else:
            self.proj = nn.Conv2d(cfg.in_chans, cfg.width, p, stride=p)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        """x: [B, C, H, W] or [B, C, T, H, W] -> tokens [B, N, D] and their grid."""
        x = self.proj(x)  # [B, D, h, w] or [B, D, t, h, w]
        grid = tuple(x.shape[2:]) if x.ndim == 5 else (1, *x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # [B, N, D]


# ----------------------------------------------------------------------------- model
class ViT(nn.Module):
    """Vanilla ViT. Input [B, C, H, W] (image) or [B, C, T, H, W] (video)."""

    def __init__(self, cfg: ViTConfig, linear_init: str = "trunc_normal"):
        super().__init__()
        if linear_init not in LINEAR_INITS:
            raise ValueError(f"linear_init must be one of {LINEAR_INITS}, got {linear_init!r}")
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        if cfg.pos_embed == "learned":
            # one row per patch token, plus one for the cls token (as timm / HF lay it out)
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix + cfg.num_patches, D))
        else:
            self.register_buffer("pos_embed", self.fixed_pos_embed(cfg.grid), persistent=False)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # linear rule
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.mlp_hidden, cfg.qkv_bias, r, cfg.norm_eps, attn_scale=cfg.attn_scale,
                  branch_mult=cfg.branch_mult) for r in rates
        )
        # Normalises every token (pool="cls", MAE's encoder output), or for pool="mean" the
        # pooled feature, as timm's fc_norm and MAE / VideoMAE fine-tuning do.
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else None
        self.init_weights(linear_init)

    def fixed_pos_embed(self, grid: Grid) -> Tensor:
        """[1, prefix + N, D] fixed table of the config's kind; the cls token's row is zeros (as MAE)."""
        pos = fixed_pos_embed(self.cfg.pos_embed, self.cfg.width, grid)
        return torch.cat([pos.new_zeros(self.cfg.num_prefix, pos.shape[1]), pos])[None]

    def init_weights(self, linear_init: str = "trunc_normal") -> None:
        """Draw every weight; biases zero, norms one. Linears: `linear_init` "trunc_normal" draws
        N(0, 0.02) cut at +-2 (timm / DeiT), "xavier" uniform on +-sqrt(6 / (fan_in + fan_out))
        (MAE's and VideoMAE's _init_weights). The patch projection is xavier on its flattened
        [D, C*u*p*p] view either way, as MAE; the cls token N(0, 0.02), a learned position table
        truncated N(0, 0.02).

        Under muP the blocks' hidden matrices draw with std 0.02 / sqrt(width_mult) under
        "trunc_normal". Under "xavier" they keep xavier's own bound, which already is muP's rule:
        both fans grow with width, so the variance 2 / (fan_in + fan_out) is the base's over
        width_mult (std x 1/sqrt(width_mult), as hidden_std), with xavier's constant at the base.
        """
        xavier = linear_init == "xavier"
        hidden = {id(w) for w in self.hidden_matrices().values()}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if xavier:
                    nn.init.xavier_uniform_(m.weight)
                else:
                    std = self.cfg.hidden_std if id(m.weight) in hidden else INIT_STD
                    nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), gain=self.embed_gain())
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:  # MAE: normal_(std=.02); timm: trunc_normal_ (cut at +-2: the same)
            (nn.init.normal_ if xavier else nn.init.trunc_normal_)(self.cls_token, std=INIT_STD)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)

    def start_fine_tuning(self) -> list[str]:
        """After pre-trained weights are loaded (MAE / VideoMAE fine-tuning): the new class head
        starts tiny (std HEAD_INIT_STD, bias 0), and where the model pools by mean the final norm
        starts fresh, as MAE's fc_norm (the pre-trained norm was fitted to tokens, not to their
        mean). What was reset, for the log."""
        done = []
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.head.bias)
            done.append(f"class head drawn with std {HEAD_INIT_STD:g}")
        if self.cfg.pool == "mean":
            self.norm.reset_parameters()
            done.append("final norm fresh for the pooled mean (fc_norm)")
        return done

    def embed_gain(self) -> float:
        """Xavier gain of the patch projection: 1, but under muP the one that keeps the base's
        std (xavier's std sqrt(2 / (fan_in + width)) would shrink with width; muP wants input
        weights' init independent of width)."""
        fan_in, width = self.cfg.patch_dim, self.cfg.width
        return math.sqrt((fan_in + width) / (fan_in + width / self.cfg.width_mult))

    def hidden_matrices(self) -> dict[str, nn.Parameter]:
        """The blocks' linear weights (qkv, attn proj, mlp fc1, fc2) by name: muP's hidden
        matrices, both of whose dimensions grow with width."""
        return {f"blocks.{i}.{name}.weight": m.weight for i, block in enumerate(self.blocks)
                for name, m in block.named_modules() if isinstance(m, nn.Linear)}

    def lr_multipliers(self) -> dict[str, float]:
        """AdamW LR multipliers by parameter name, for those other than 1 (muP: hidden matrices
        x 1/width_mult x depth_mult^-DEPTH_LR_EXPONENT; input-like weights, biases, norms, head x 1)."""
        mult = 1.0 / (self.cfg.width_mult * self.cfg.depth_mult**DEPTH_LR_EXPONENT)
        return {name: mult for name in self.hidden_matrices()} if mult != 1.0 else {}

    def pos_embed_for(self, grid: Grid) -> Tensor:
        """Position embedding for a grid, resampled if it differs from the config's."""
        if self.cfg.pos_embed != "learned":
            return self.pos_embed if grid == self.cfg.grid else self.fixed_pos_embed(grid).to(self.pos_embed)
        prefix = self.pos_embed[:, : self.cfg.num_prefix]
        patches = resample_pos_embed(self.pos_embed[:, self.cfg.num_prefix :], self.cfg.grid, grid)
        return torch.cat([prefix, patches], dim=1)

    def forward_features(self, x: Tensor, keep: Tensor | None = None, mask: Tensor | None = None,
                         mask_token: Tensor | None = None, norm: bool = True) -> Tensor:
        """Encode an input into tokens, normalised unless norm=False.

        Args:
            x: [B, C, H, W] or [B, C, T, H, W].
            keep: optional [B, K] indices of the patch tokens to encode (MAE runs the
                encoder on the visible tokens only); None encodes all N.
            mask, mask_token: optional [B, N] (1 = masked) and [1, 1, D]: masked patch
                tokens are replaced by the token before positions are added (MAE's
                "encoder with mask tokens" ablation).
            norm: apply the final norm to every token (False: the last block's output).
        Tokens are dropped after block cfg.drop_after (cfg.keep < 1) only when all are encoded
        (keep and mask None): MAE's masked encoder is never thinned further.
        Returns:
            [B, prefix + K, D] tokens, the cls token first when there is one; with dropping,
            prefix + cfg.kept(N) tokens.
        """
        x, grid = self.patch_embed(x)  # [B, N, D]
        if mask is not None:
            x = torch.where(mask[..., None].bool(), mask_token.to(x.dtype), x)
        pos = self.pos_embed_for(grid)  # [1, prefix + N, D]
        x = x + pos[:, self.cfg.num_prefix :]
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
            x = torch.cat([cls, x], dim=1)  # [B, 1 + K, D]
        drop_at = self.cfg.drop_after if self.cfg.drops and keep is None and mask is None else -1
        for i, block in enumerate(self.blocks, start=1):
            if i != drop_at:
                x = block(x)
            elif self.cfg.drop_by == "random":
                x = self.drop_tokens(block(x), None, grid)
            else:
                x = self.drop_tokens(*block(x, cls_attn=True), grid)
        return self.norm(x) if norm else x

    def drop_tokens(self, x: Tensor, cls_attn: Tensor | None, grid: Grid) -> Tensor:
        """Keep the prefix and cfg.kept(N) of the N patch tokens, in their original order.

        x: [B, prefix + N, D]; cls_attn: [B, prefix + N] the cls token's attention (None for
        "random") -> [B, prefix + K, D]. See DROP_BY for the rules.
        """
        p = self.cfg.num_prefix
        patches = x[:, p:]  # [B, N, D]
        B, N, D = patches.shape
        k = self.cfg.kept(N)
        if self.cfg.drop_by == "random" and self.training:
            idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :k]  # [B, K]
        elif self.cfg.drop_by == "random":
            idx = (torch.arange(k, device=x.device) * N // k).expand(B, k)  # evenly spaced
        else:
            score = cls_attn[:, p:].float()  # [B, N]
            if self.cfg.drop_by == "keyframe":
                t, h, w = grid
                mid = t // 2 * h * w  # the middle frame's tokens come first in the ranking
                score = torch.cat([score[:, :mid], torch.full_like(score[:, mid : mid + h * w], math.inf),
                                   score[:, mid + h * w :]], dim=1)
            idx = score.topk(k, dim=1).indices  # [B, K]
        idx = idx.sort(dim=1).values
        kept = torch.gather(patches, 1, idx[..., None].expand(-1, -1, D))  # [B, K, D]
        return torch.cat([x[:, :p], kept], dim=1)

    def pool(self, tokens: Tensor) -> Tensor:
        """Un-normalised tokens [B, L, D] -> normalised feature [B, D]: the cls token, or the
        mean of the patch tokens (then the norm: timm's fc_norm, as MAE / VideoMAE fine-tune)."""
        if self.cfg.pool == "cls":
            return self.norm(tokens[:, 0])  # the norm is per token: as norm(tokens)[:, 0]
        return self.norm(tokens[:, self.cfg.num_prefix :].mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, (T,) H, W] -> logits [B, classes], or pooled features [B, D] with no head."""
        features = self.pool(self.forward_features(x, norm=False))
        if self.head is None:
            return features
        mult = self.cfg.readout_mult  # muP's readout: the head sees features / width_mult
        return self.head(features * mult if mult != 1.0 else features)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

