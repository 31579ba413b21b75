"""Masked autoencoders for images and video: masking, a light decoder and the pixel loss.

References:
  MAE: He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (random masking
  of 75% of the patches, the encoder sees only the visible ones, an 8-block 512-wide
  decoder with mask tokens, MSE on the masked patches of per-patch normalised pixels).
  VideoMAE: Tong et al. 2022 (tube masking at 90%: one spatial mask for every time step,
  so a masked cube cannot be copied from its neighbour in time; no cls token).
  VideoMAE V2: Wang et al. 2023 (dual masking: the decoder too sees only part of the
  masked tokens, chosen by a "running cell" mask, and the loss is on those alone).

The encoder is a plain `ViT(num_classes=0)` kept as `MAE.encoder`, so its weights load
straight into a classifier for fine-tuning. Token order everywhere is ViT's PatchEmbed
order (t, then h, then w); within a patch the values run (tubelet, p, p, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vitscale.common.errors import UserError
from vitscale.models.layers import Block, Grid, fixed_pos_embed
from vitscale.models.vit import ViT, ViTConfig

MASKINGS = ("random", "tube")
NORM_PIX_BY = ("patch", "channel")
DECODER_MASKINGS = ("running_cell", "random")


@dataclass(frozen=True)
class MAEConfig:
    # share of patch tokens hidden from the encoder: a high ratio makes the task hard enough to learn
    # from and the encoder cheap, as it sees the rest only (MAE: 0.75; VideoMAE: 0.9 for video)
    mask_ratio: float = 0.75
    masking: str = "random"  # "random" per token, or "tube": one spatial mask for every time step (video)
    decoder_width: int = 512  # decoder token dimension (MAE: 512; VideoMAE ViT-B: 384)
    decoder_depth: int = 8  # decoder blocks (MAE: 8; VideoMAE: 4); the decoder is dropped after pre-training
    decoder_heads: int = 16  # decoder attention heads; must divide decoder_width

    # predict each patch's pixels normalised by their own mean and std, as MAE does; "auto" (the
    # pretrain recipe's): on for real data, off for the built-in digits
    norm_pix_loss: bool | str = True

    # "patch": one mean and std per patch (MAE); "channel": one per channel of a patch, std + eps,
    # on whatever pixels the loss is given (VideoMAE, and transformers' VideoMAE)
    norm_pix_by: str = "patch"
    encoder_on_all_tokens: bool = False  # ablation (MAE Table 2): the encoder sees mask tokens, all N
    decoder_pos_embed: str = "sincos"  # the decoder's fixed positions: "sincos" (MAE), "sincos1d" (VideoMAE)

    # VideoMAE V2's dual masking: the share of masked tokens the decoder also drops, for a cheaper
    # decoder (0 = off)
    decoder_mask_ratio: float = 0.0
    decoder_masking: str = "running_cell"  # which it drops: "running_cell" (VideoMAE V2) or "random"

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.norm_pix_loss not in (True, False, "auto"):
            raise UserError(f"mae.norm_pix_loss must be true, false or auto, got {self.norm_pix_loss!r}")
        if self.norm_pix_by not in NORM_PIX_BY:
            raise UserError(f"mae.norm_pix_by must be 'patch' or 'channel', got {self.norm_pix_by!r}")
        if self.masking not in MASKINGS:
            raise UserError(f"mae.masking must be 'random' or 'tube', got {self.masking!r}")
        if self.decoder_width < 1 or self.decoder_depth < 0 or self.decoder_heads < 1:
            raise UserError("mae.decoder_width and decoder_heads must be positive, decoder_depth >= 0")
        if self.decoder_width % self.decoder_heads:
            raise UserError(f"mae.decoder_width {self.decoder_width} is not divisible by "
                             f"mae.decoder_heads {self.decoder_heads}")
        if self.decoder_pos_embed not in ("sincos", "sincos1d"):
            raise UserError(f"mae.decoder_pos_embed must be 'sincos' or 'sincos1d', "
                             f"got {self.decoder_pos_embed!r}")
        if not 0.0 <= self.decoder_mask_ratio < 1.0:
            raise UserError(f"mae.decoder_mask_ratio must be in [0, 1), got {self.decoder_mask_ratio}")
        if self.decoder_masking not in DECODER_MASKINGS:
            raise UserError(f"mae.decoder_masking must be 'running_cell' or 'random', "
                             f"got {self.decoder_masking!r}")
        if self.decoder_mask_ratio and self.decoder_masking == "running_cell" \
                and self.decoder_mask_ratio not in (0.25, 0.5, 0.75):
            raise UserError(f"mae.decoder_mask_ratio must be 0.25, 0.5 or 0.75 with running_cell masking "
                             f"(1, 2 or 3 of each 2x2 cell dropped), got {self.decoder_mask_ratio}")
        if self.decoder_mask_ratio and self.encoder_on_all_tokens:
            raise UserError("mae.decoder_mask_ratio needs the encoder on the visible tokens only "
                            "(mae.encoder_on_all_tokens=false)")
        multiple = 4 if self.decoder_pos_embed == "sincos" else 2
        if self.decoder_width % multiple:
            raise UserError(f"mae.decoder_width must be a multiple of {multiple} ({self.decoder_pos_embed} "
                             f"positions), got {self.decoder_width}")

    @property
    def norm_pix(self) -> bool:
        """Whether the target is normalised: norm_pix_loss, with "auto" (not yet resolved against
        the data) taken as MAE's default, on."""
        return self.norm_pix_loss is not False


# ----------------------------------------------------------------------------- patches
def patchify(x: Tensor, cfg: ViTConfig) -> Tensor:
    """Cut an input into flattened patches, one row per token.

    x: [B, C, H, W] or [B, C, T, H, W] -> [B, N, patch_dim], N in (t, h, w) order as ViT's
    PatchEmbed flattens its tokens, each row in (tubelet, p, p, C) order.
    """
    video = x.ndim == 5
    x = x if video else x[:, :, None]  # an image is a clip of one frame: [B, C, 1, H, W]
    B, C, T, H, W = x.shape
    u, p = cfg.tubelet if video else 1, cfg.patch_size
    t, h, w = T // u, H // p, W // p
    x = x.reshape(B, C, t, u, h, p, w, p)  # split each axis into (token, within-token)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, t, h, w, u, p, p, C]
    return x.reshape(B, t * h * w, u * p * p * C)


def unpatchify(patches: Tensor, cfg: ViTConfig, grid: Grid | None = None) -> Tensor:
    """Inverse of `patchify`: [B, N, patch_dim] -> [B, C, H, W] (image config) or
    [B, C, T, H, W] (video config). `grid` (t, h, w) defaults to the config's."""
    t, h, w = grid or cfg.grid
    B, C = patches.shape[0], cfg.in_chans
    u, p = cfg.tubelet, cfg.patch_size
    x = patches.reshape(B, t, h, w, u, p, p, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, t, u, h, p, w, p]
    x = x.reshape(B, C, t * u, h * p, w * p)  # [B, C, T, H, W]
    return x if cfg.is_video else x[:, :, 0]


def grid_of(x: Tensor, cfg: ViTConfig) -> Grid:
    """Token grid (t, h, w) of an input under a config's patch and tubelet sizes."""
    H, W = x.shape[-2:]
    T = x.shape[2] // cfg.tubelet if x.ndim == 5 else 1
    return T, H // cfg.patch_size, W // cfg.patch_size


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch normalised pixels (MAE's norm-pix target) and the mean and std used.

    patches: [B, N, P] -> ([B, N, P], mean [B, N, 1], std [B, N, 1]); the variance is
    unbiased, as in MAE, and `normalised * std + mean` gives the patches back.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return (patches - mean) / std, mean, std


def normalize_channels(patches: Tensor, channels: int, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """VideoMAE's norm-pix target: each channel of each patch normalised over its u*p*p pixels.

    patches: [B, N, P] rows in (tubelet, p, p, C) order -> ([B, N, P], mean [B, N, P], std [B, N, P]).
    As VideoMAE's engine_for_pretraining (and transformers' VideoMAEForPreTraining) the std is
    unbiased with eps added to it, not to the variance as in MAE's form.
    """
    B, N, P = patches.shape
    x = patches.reshape(B, N, P // channels, channels)  # [B, N, u*p*p, C]
    mean = x.mean(dim=-2, keepdim=True).expand_as(x)  # [B, N, u*p*p, C]
    std = (x.var(dim=-2, keepdim=True).sqrt() + eps).expand_as(x)
    return ((x - mean) / std).reshape(B, N, P), mean.reshape(B, N, P), std.reshape(B, N, P)


# ----------------------------------------------------------------------------- masking
class Masking(NamedTuple):
    keep: Tensor  # [B, K] indices of the visible tokens
    mask: Tensor  # [B, N] float, 1 = masked (hidden from the encoder), 0 = visible
    restore: Tensor  # [B, N] where each token sits in cat(visible, masked): unshuffles


def num_visible(n: int, ratio: float) -> int:
    """Tokens left visible out of n at a mask ratio: at least one kept and one masked."""
    return min(max(round(n * (1.0 - ratio)), 1), n - 1)


def random_masking(batch: int, n: int, ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, noise: Tensor | None = None) -> Masking:
    """Mask `ratio` of n tokens per sample, uniformly at random (MAE).

    Returns keep [B, K], mask [B, N] (1 = masked) and restore [B, N], K = num_visible(n, ratio).
    Draws from `generator` when given, else from the global RNG; a given `noise` [B, N]
    replaces the draw (to repeat another implementation's masking, e.g. transformers' ViTMAE).
    """
    device = noise.device if noise is not None else generator.device if generator is not None else device
    k = num_visible(n, ratio)
    if noise is None:
        noise = torch.rand(batch, n, generator=generator, device=device)  # [B, N] one draw per token
    shuffle = noise.argsort(dim=1)  # [B, N] token ids, smallest noise first: a random permutation
    restore = shuffle.argsort(dim=1)  # [B, N] its inverse: position of each token in `shuffle`
    keep = shuffle[:, :k]  # [B, K] the first K of the permutation stay visible
    mask = torch.ones(batch, n, device=device)  # [B, N] in shuffled order: all masked ...
    mask[:, :k] = 0  # ... but the first K
    mask = mask.gather(1, restore)  # [B, N] back in token order
    return Masking(keep, mask, restore)


def tube_masking(batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Masking:
    """Mask `ratio` of the h*w spatial positions per sample, the same ones at every time step
    (VideoMAE). grid (t, h, w) -> keep [B, t*K], mask [B, t*h*w], restore [B, t*h*w]."""
    t, h, w = grid
    space = random_masking(batch, h * w, ratio, generator, device).mask  # [B, h*w]
    return masking_of(space.repeat(1, t))  # [B, t*h*w]: tokens run t-major, so tile the frame mask


def masking_of(mask: Tensor) -> Masking:
    """The masking of a given [B, N] mask (1 or True = masked; the same count in every row),
    visible tokens kept in ascending order (as VideoMAE's bool_masked_pos selects them)."""
    mask = mask.float()
    shuffle = mask.argsort(dim=1, stable=True)  # [B, N] visible ids ascending, then masked ids
    k = int(mask.shape[1] - mask[0].sum())
    return Masking(shuffle[:, :k], mask, shuffle.argsort(dim=1))


def running_cell_mask(batch: int, grid: Grid, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """VideoMAE V2's running-cell decoder mask: [B, t*h*w] float, 1 = dropped by the decoder.

    Each frame is tiled with 2x2 cells; a cell drops c = 4 * ratio of its 4 positions (in
    raster order: a queue of c ones then 4 - c zeros read from a pointer), and the pointer
    moves one step per frame, so every position is kept in some of any 4 frames. The start
    is one of 4 per sample, drawn from `generator` (or the global RNG). With an odd h or w
    the last row or column holds half cells.
    """
    t, h, w = grid
    c = round(4 * ratio)
    draw_on = generator.device if generator is not None else device
    start = torch.randint(4, (batch,), generator=generator, device=draw_on).to(device)  # [B]
    queue = (torch.arange(4, device=device) < c).float()  # [4]: c dropped, then the kept ones
    ptr = start[:, None] + 1 + torch.arange(t, device=device)  # [B, t]: moved once before each frame
    unit = queue[(ptr[..., None] + torch.arange(4, device=device)) % 4].reshape(batch, t, 2, 2)
    rows, cols = torch.arange(h, device=device) % 2, torch.arange(w, device=device) % 2
    return unit[:, :, rows[:, None], cols[None, :]].reshape(batch, t * h * w)  # [B, t, h, w] tiled


def decoder_keep(mask: Tensor, count: int, drop: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Which `count` masked tokens the decoder reconstructs: [B, M] token ids, ascending.

    mask [B, N] (1 = masked, the same number per row); drop [B, N] (1 = the decoder
    mask drops it) or None for a uniform choice. Masked tokens the decoder mask keeps come
    first, in random order, so where it keeps more or fewer than `count` (its cells fall
    on masked and visible tokens unevenly) the difference is made up at random.
    """
    draw_on = generator.device if generator is not None else mask.device
    score = torch.rand(mask.shape, generator=generator, device=draw_on).to(mask.device)  # [B, N] in [0, 1)
    if drop is not None:
        score = score + drop  # dropped ones after the kept ones
    score = score + 2 * (1 - mask)  # encoder-visible tokens last: never chosen
    return score.argsort(dim=1)[:, :count].sort(dim=1).values  # [B, M]


# ----------------------------------------------------------------------------- model
class MAE(nn.Module):
    """A ViT encoder on the visible tokens, a small transformer decoder on all of them.

    forward(x) -> (loss, pred [B, N, patch_dim], mask [B, N] with 1 = masked).
    """

    def __init__(self, encoder_cfg: ViTConfig, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(encoder_cfg.replace(num_classes=0), linear_init="xavier")  # as MAE / VideoMAE
        ecfg, D = self.encoder.cfg, cfg.decoder_width
        self.prefix = ecfg.num_prefix  # the cls token, when the encoder has one, goes through too
        self.decoder_embed = nn.Linear(ecfg.width, D)
        # The learned mask token enters the decoder (width Dd), or for MAE's ablation the
        # encoder (width D), which then runs on all N tokens.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ecfg.width if cfg.encoder_on_all_tokens else D))
        self.register_buffer("decoder_pos", self._decoder_pos(ecfg.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(D, cfg.decoder_heads, int(D * ecfg.mlp_ratio), ecfg.qkv_bias, 0.0, ecfg.norm_eps)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(D, eps=ecfg.norm_eps)
        self.decoder_pred = nn.Linear(D, ecfg.patch_dim)
        self._init_decoder()

    def _decoder_pos(self, grid: Grid) -> Tensor:
        """[1, prefix + N, Dd] fixed decoder positions; the cls token's row is zeros."""
        pos = fixed_pos_embed(self.cfg.decoder_pos_embed, self.cfg.decoder_width, grid)  # [N, Dd]
        return torch.cat([pos.new_zeros(self.prefix, pos.shape[1]), pos])[None]

    def _init_decoder(self) -> None:
        """Xavier decoder linears, unit norms, N(0, 0.02) mask tokens (as MAE)."""
        decoder = [self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for m in (m for part in decoder for m in part.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # --------------------------------------------------------------------- steps
    def make_mask(self, batch: int, grid: Grid, device: torch.device,
                  generator: torch.Generator | None = None) -> Masking:
        """The config's masking for a batch of inputs on a (t, h, w) token grid."""
        if self.cfg.masking == "tube":
            return tube_masking(batch, grid, self.cfg.mask_ratio, generator, device)
        return random_masking(batch, grid[0] * grid[1] * grid[2], self.cfg.mask_ratio, generator, device)

    def encode_all(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encoder on all N tokens, masked ones replaced by a learned token after patch
        embedding (MAE's "encoder w/ [M]"). x: input, mask [B, N] -> [B, prefix + N, D]."""
        return self.encoder.forward_features(x, mask=mask, mask_token=self.mask_token)

    def unshuffle(self, tokens: Tensor, restore: Tensor) -> Tensor:
        """Put the visible tokens back in place, mask tokens everywhere else.

        tokens: [B, prefix + K, Dd], restore: [B, N] -> [B, prefix + N, Dd].
        """
        (B, L, Dd), P, N = tokens.shape, self.prefix, restore.shape[1]
        fill = self.mask_token.to(tokens.dtype).expand(B, P + N - L, Dd)  # [B, N - K, Dd]
        shuffled = torch.cat([tokens, fill], dim=1)  # [B, P + N, Dd]: prefix, visible, masked
        index = torch.cat([torch.arange(P, device=restore.device).expand(B, P), restore + P], dim=1)
        return shuffled.gather(1, index[..., None].expand(-1, -1, Dd))  # [B, P + N, Dd] token order

    def positions(self, grid: Grid, device: torch.device) -> Tensor:
        """[1, prefix + N, Dd] the decoder's fixed positions for a token grid."""
        return self.decoder_pos if grid == self.encoder.cfg.grid else self._decoder_pos(grid).to(device)

    def run_decoder(self, x: Tensor) -> Tensor:
        """[B, L, Dd] positioned decoder tokens -> [B, L, patch_dim]."""
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def decode(self, tokens: Tensor, grid: Grid) -> Tensor:
        """[B, prefix + N, Dd] decoder tokens -> [B, N, patch_dim] pixel predictions."""
        return self.run_decoder(tokens + self.positions(grid, tokens.device))[:, self.prefix:]  # no cls

    def make_decoder_keep(self, mask: Tensor, grid: Grid, generator: torch.Generator | None = None) -> Tensor:
        """The masked tokens the decoder reconstructs under dual masking: [B, M] ids, where
        M = the masked count less decoder_mask_ratio of it (at least one)."""
        masked = int(mask[0].sum())
        count = max(masked - round(masked * self.cfg.decoder_mask_ratio), 1)
        drop = None
        if self.cfg.decoder_masking == "running_cell":
            drop = running_cell_mask(mask.shape[0], grid, self.cfg.decoder_mask_ratio, generator, mask.device)
        return decoder_keep(mask, count, drop, generator)

    def decode_subset(self, latent: Tensor, keep: Tensor, decode: Tensor, grid: Grid) -> Tensor:
        """Dual masking's decoder: the visible tokens plus mask tokens at the `decode` ids only.

        latent: [B, prefix + K, Dd] embedded encoder output, keep: [B, K], decode: [B, M]
        -> [B, M, patch_dim] predictions for the `decode` tokens.
        """
        (B, _, Dd), P, M = latent.shape, self.prefix, decode.shape[1]
        pos = self.positions(grid, latent.device).expand(B, -1, -1)  # [B, P + N, Dd]
        ids = torch.cat([torch.arange(P, device=keep.device).expand(B, P), keep + P, decode + P], dim=1)
        pos = pos.gather(1, ids[..., None].expand(-1, -1, Dd))  # [B, P + K + M, Dd]
        tokens = torch.cat([latent, self.mask_token.to(latent.dtype).expand(B, M, Dd)], dim=1)
        return self.run_decoder(tokens + pos)[:, -M:]  # [B, M, patch_dim]

    def normalize(self, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The norm-pix target of pixels [B, N, P], by patch or by channel (mae.norm_pix_by), with
        the mean and std that take it back (each broadcasts against [B, N, P])."""
        if self.cfg.norm_pix_by == "channel":
            return normalize_channels(target.float(), self.encoder.cfg.in_chans)
        return normalize_patches(target.float())

    def loss(self, target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the masked patches only.

        target: [B, N, P] pixels (normalised here when norm_pix_loss: see `normalize`),
        pred: [B, N, P], mask: [B, N] (1 = masked) -> scalar. The pixels are the model's input
        as given, normalised data (MAE's form); transformers' VideoMAE takes its ImageNet-normalised
        input back to [0, 1] first: pass those pixels here to reproduce its loss.
        """
        if self.cfg.norm_pix:
            target = self.normalize(target)[0]
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: Tensor, generator: torch.Generator | None = None, masking: Masking | None = None,
                decode_all: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, C, H, W] or [B, C, T, H, W] -> (loss, pred [B, N, patch_dim], mask [B, N]).

        A given `masking` replaces the config's random draw. Under dual masking
        (decoder_mask_ratio > 0, unless `decode_all`) the decoder predicts only some masked
        tokens: `pred` is zero elsewhere and the returned mask marks just those, the tokens
        the loss covers; the draws come from `generator` after the encoder mask's."""
        grid = grid_of(x, self.encoder.cfg)
        if masking is None:
            masking = self.make_mask(x.shape[0], grid, x.device, generator)
        keep, mask, restore = masking
        target = patchify(x, self.encoder.cfg)  # [B, N, patch_dim]
        if self.cfg.encoder_on_all_tokens:
            tokens = self.decoder_embed(self.encode_all(x, mask))  # [B, prefix + N, Dd]
        else:
            latent = self.decoder_embed(self.encoder.forward_features(x, keep))  # [B, prefix + K, Dd]
            if self.cfg.decoder_mask_ratio and not decode_all:
                decode = self.make_decoder_keep(mask, grid, generator)  # [B, M]
                sub = self.decode_subset(latent, keep, decode, grid)  # [B, M, patch_dim]
                pred = sub.new_zeros(target.shape).scatter(1, decode[..., None].expand_as(sub), sub)
                seen = mask.new_zeros(mask.shape).scatter(1, decode, 1.0)  # [B, N] 1 = decoded
                return self.loss(target, pred, seen), pred, seen
            tokens = self.unshuffle(latent, restore)  # [B, prefix + N, Dd]
        pred = self.decode(tokens, grid)  # [B, N, patch_dim]
        return self.loss(target, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Pictures of one masked pass, each shaped like x and in x's pixel space.

        Returns "original" (x), "masked" (masked patches zeroed) and "reconstruction"
        (visible patches from x, predictions on masked ones). With norm_pix_loss the
        predictions are un-normalised with each target patch's own mean and std (per channel under
        norm_pix_by="channel").
        """
        cfg = self.encoder.cfg
        _, pred, mask = self(x, generator, decode_all=True)  # every masked patch, dual masking or not
        target = patchify(x, cfg)  # [B, N, P]
        pred = pred.float()
        if self.cfg.norm_pix:
            _, mean, std = self.normalize(target)
            pred = pred * std + mean  # back to pixels
        m = mask[..., None]  # [B, N, 1]
        grid = grid_of(x, cfg)
        return {
            "original": x,
            "masked": unpatchify(target * (1 - m), cfg, grid),
            "reconstruction": unpatchify(target * (1 - m) + pred.to(target.dtype) * m, cfg, grid),
        }
