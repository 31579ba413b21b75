"""Analytic cost of a ViT from its config alone: params, flops and activations.

Definitions (see DESIGN.md; they must not drift):
  params: sum(p.numel()) of the built model.
  flops:  multiply-adds, as pycls / fvcore / the vision papers count them, over every
          linear and conv layer, their bias additions, and both attention matmuls
          (q @ k^T and attn @ v). Norms, softmax, GELU and position adds are not counted.
          ViT-B/16 at 224 px: 17.58 G.
  acts:   Dollar, Singh, Girshick 2021 ("Fast and Accurate Model Scaling", pycls): the
          elements output by every conv and linear layer, plus the attention score maps
          (heads x L x L) and the attention outputs (L x D). ViT-B/16 at 224 px: ~23.9 M.

Token dropping (cfg.keep < 1): the first cfg.drop_after blocks see prefix + N tokens, the
rest prefix + round(keep * N); ranking by cls attention adds its q_cls @ k^T (L x D flops)
in the drop block, whose [H, 1, L] row is not counted in acts (it is part of a score map).

The tests tie every formula here to the built model (params) and to PyTorch's
FlopCounterMode on a real forward pass (flops without bias additions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vitscale.models.vit import ViTConfig


@dataclass(frozen=True)
class Cost:
    params: int  # parameters
    flops: int  # multiply-adds for one sample's forward pass
    acts: int  # activation elements for one sample's forward pass
    bias_flops: int  # the part of `flops` that is bias additions

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def as_dict(self) -> dict:
        return asdict(self)


def _linear(tokens: int, d_in: int, d_out: int, bias: bool = True) -> tuple[int, int, int, int]:
    """(params, macs, bias adds, acts) of a linear layer applied to `tokens` rows."""
    return d_in * d_out + d_out * bias, tokens * d_in * d_out, tokens * d_out * bias, tokens * d_out


def cost(cfg: ViTConfig, **relax: float) -> Cost:
    """Params, flops (multiply-adds) and acts of one forward pass of ViT(cfg), one sample.

    `relax` may replace `width`, `depth` or `num_patches` by real numbers: the scaler
    solves against this continuous relaxation before it rounds to a valid config.
    """
    D = relax.get("width", cfg.width)
    N = relax.get("num_patches", cfg.num_patches)
    depth = relax.get("depth", cfg.depth)
    M = D * cfg.mlp_ratio if "width" in relax else cfg.mlp_hidden
    H = cfg.heads
    L = N + cfg.num_prefix  # tokens seen by every block before a drop
    # Each entry: (params, macs, bias adds, acts).
    layers = [_linear(N, cfg.patch_dim, D)]  # patch / tubelet embedding (a strided conv)

    def blocks(count: float, L: float) -> list[tuple]:
        block = [
            _linear(L, D, 3 * D, cfg.qkv_bias),  # fused qkv
            (0, L * L * D, 0, H * L * L),  # q @ k^T -> score maps [H, L, L]
            (0, L * L * D, 0, L * D),  # attn @ v -> attention output [L, D]
            _linear(L, D, D),  # output projection
            _linear(L, D, M),  # mlp fc1
            _linear(L, M, D),  # mlp fc2
            (4 * D, 0, 0, 0),  # two layer norms
        ]
        return [tuple(count * v for v in layer) for layer in block]

    if cfg.drops:
        kept = cfg.keep * N if "num_patches" in relax else cfg.kept(N)
        layers += blocks(cfg.drop_after, L) + blocks(depth - cfg.drop_after, kept + cfg.num_prefix)
        if cfg.drop_by != "random":
            layers.append((0, L * D, 0, 0))  # the cls row q_cls @ k^T that ranks the tokens
    else:
        layers += blocks(depth, L)
    if cfg.num_classes:
        layers.append(_linear(1, D, cfg.num_classes))  # head on the pooled feature
    embeddings = D * cfg.num_prefix  # cls token
    if cfg.pos_embed == "learned":
        embeddings += D * L  # learned position table (sincos is a fixed buffer)
    params, macs, bias, acts = (sum(col) for col in zip(*layers, strict=True))
    return Cost(params=params + embeddings + 2 * D, flops=macs + bias, acts=acts, bias_flops=bias)
