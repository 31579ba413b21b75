"""Token dropping after a block (EViT by cls attention, random, EVAD's keyframe for video)."""

import pytest
import torch
from conftest import meta_model
from test_complexity import _hooked_acts
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.common.errors import UserError
from vitscale.cost.complexity import cost
from vitscale.cost.measure import example_input
from vitscale.models import ViT, param_count, preset


def _pair(**drop):
    """A plain pico model and one with token dropping, holding the same weights."""
    cfg = preset("pico/4", num_classes=10, **drop)
    plain, dropping = ViT(cfg.replace(keep=1.0, drop_after=0)).eval(), ViT(cfg).eval()
    dropping.load_state_dict(plain.state_dict())
    return plain, dropping


@pytest.mark.parametrize("drop_by", ["attention", "random"])
def test_keep_one_is_exactly_the_plain_model(drop_by):
    plain, dropping = _pair(drop_after=2, keep=1.0, drop_by=drop_by)
    x = torch.randn(3, 3, 32, 32)
    for train in (False, True):
        plain.train(train), dropping.train(train)
        assert torch.equal(plain(x), dropping(x))
    assert not torch.equal(plain(x), _pair(drop_after=2, keep=0.5, drop_by=drop_by)[1].train()(x))


@pytest.mark.parametrize("bad", [
    dict(keep=0.0, drop_after=1), dict(keep=1.5, drop_after=1), dict(keep=0.5),  # drop_after=0: no drop
    dict(keep=0.5, drop_after=4), dict(keep=0.5, drop_after=1, drop_by="top"),
    dict(keep=0.5, drop_after=1, pool="mean", class_token=False),  # attention needs the cls token
    dict(keep=0.5, drop_after=1, drop_by="keyframe"),  # an image has no keyframe
])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        preset("pico/4", **bad)


def test_keyframe_needs_at_least_one_frame_of_tokens():
    with pytest.raises(UserError, match="keep >= 0.25"):
        preset("pico/4-f8", keep=0.2, drop_after=1, drop_by="keyframe")
    preset("pico/4-f8", keep=0.25, drop_after=1, drop_by="keyframe")


def test_cls_attention_row_matches_torch_multihead_attention():
    torch.manual_seed(1)
    block = ViT(preset("pico/4")).blocks[0].eval()
    reference = nn.MultiheadAttention(64, 2, batch_first=True).eval()
    reference.in_proj_weight.data.copy_(block.attn.qkv.weight)
    reference.in_proj_bias.data.copy_(block.attn.qkv.bias)
    x = torch.randn(2, 65, 64)
    y = block.norm1(x)
    out, row = block.attn(y, cls_attn=True)
    _, weights = reference(y, y, y, need_weights=True, average_attn_weights=True)  # [B, L, L]
    torch.testing.assert_close(row, weights[:, 0])
    assert torch.equal(out, block.attn(y))  # the extra row leaves the output as it was
    assert torch.equal(block(x, cls_attn=True)[0], block(x))


def test_attention_drop_keeps_the_most_attended_tokens():
    _, model = _pair(drop_after=2, keep=0.25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.patch_embed(x)
        tokens = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1),
                            tokens + model.pos_embed[:, 1:]], dim=1)  # [B, 65, D]
        tokens = model.blocks[0](tokens)
        y = model.blocks[1].norm1(tokens)
        qkv = model.blocks[1].attn.qkv(y).reshape(2, 65, 3, 2, 32).permute(2, 0, 3, 1, 4)
        scores = (qkv[0, :, :, :1] @ qkv[1].transpose(-2, -1) / 32**0.5).softmax(-1).mean(1)[:, 0]
        top = scores[:, 1:].argsort(dim=1, descending=True)[:, :16].sort(dim=1).values  # [B, 16]
        tokens = model.blocks[1](tokens)
        picked = torch.stack([t[1:][i] for t, i in zip(tokens, top, strict=True)])  # [B, 16, D]
        kept = torch.cat([tokens[:, :1], picked], dim=1)
        for block in model.blocks[2:]:
            kept = block(kept)
        out = model.forward_features(x)
    assert out.shape == (2, 1 + 16, 64)
    torch.testing.assert_close(out, model.norm(kept))


def test_random_drop_is_a_fresh_subset_in_training_and_evenly_spaced_at_eval():
    _, model = _pair(drop_after=1, keep=0.5, drop_by="random")
    x = torch.arange(2 * 9 * 4, dtype=torch.float).reshape(2, 9, 4)  # a prefix token + 8 patch tokens
    model.train()
    kept = model.drop_tokens(x, None, (1, 2, 4))
    assert kept.shape == (2, 1 + 4, 4) and torch.equal(kept[:, 0], x[:, 0])
    for sample, source in zip(kept, x, strict=True):  # distinct patch tokens of the sample's own
        rows = {tuple(r.tolist()) for r in sample[1:]}
        assert len(rows) == 4 and rows <= {tuple(r.tolist()) for r in source[1:]}
    model.eval()
    assert torch.equal(model.drop_tokens(x, None, (1, 2, 4)), x[:, [0, 1, 3, 5, 7]])


def test_keyframe_drop_keeps_the_whole_middle_frame():
    cfg = preset("pico/4-f8", keep=0.5, drop_after=1, drop_by="keyframe")  # grid (4, 8, 8)
    model = ViT(cfg).eval()
    n, per_frame = cfg.num_patches, 64
    x = torch.randn(1, 1 + n, 64)
    score = torch.cat([torch.ones(1, 1), torch.linspace(1, 0, n)[None]], dim=1)  # later = less attended
    kept = model.drop_tokens(x, score, cfg.grid)
    middle = x[:, 1 + 2 * per_frame : 1 + 3 * per_frame]
    top_others = x[:, 1 : 1 + n // 2 - per_frame]  # then the most attended of the other frames
    assert torch.equal(kept, torch.cat([x[:, :1], top_others, middle], dim=1))
    assert model(example_input(cfg, 2)).shape == (2, cfg.num_classes)


def test_mean_pool_averages_the_kept_tokens():
    _, model = _pair(drop_after=1, keep=0.5, drop_by="random", pool="mean", class_token=False)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x, norm=False)
    assert tokens.shape == (2, 32, 64)
    torch.testing.assert_close(model(x), model.head(model.norm(tokens.mean(dim=1))))


DROPS = [
    dict(drop_after=1, keep=0.5), dict(drop_after=3, keep=0.7, drop_by="random"),
    dict(drop_after=2, keep=0.3, pool="mean", class_token=False, drop_by="random"),
    dict(drop_after=1, keep=0.7, pos_embed="sincos", image_size=(48, 32)),
]
VIDEO = dict(drop_after=2, keep=0.5, drop_by="keyframe")


@pytest.mark.parametrize("cfg", [preset("pico/4", **d) for d in DROPS] + [preset("pico/4-f8", **VIDEO)])
def test_cost_matches_the_built_model_and_pytorch_flop_counter(cfg):
    model = meta_model(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(example_input(cfg, 1, "meta"))
    c = cost(cfg)
    assert c.flops - c.bias_flops == counter.get_total_flops() // 2
    assert c.params == param_count(model) == cost(cfg.replace(keep=1.0)).params
    assert c.acts == _hooked_acts(cfg)


def test_cost_of_the_blocks_after_the_drop_counts_the_kept_tokens():
    plain = cost(preset("S/16"))
    half = cost(preset("S/16", drop_after=4, keep=0.5, drop_by="random"))
    per_block = lambda L: 4 * L * 384**2 + 2 * L * L * 384 + 2 * L * 384 * 1536  # noqa: E731
    saved = plain.flops - half.flops - (plain.bias_flops - half.bias_flops)
    assert saved == 8 * (per_block(197) - per_block(99))
    assert cost(preset("S/16", drop_after=4, keep=0.5)).flops - half.flops == 197 * 384  # the cls row
