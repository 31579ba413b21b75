"""The analytic cost model against the built model, PyTorch's counters and published figures."""

import pytest
from conftest import ALL_PRESETS, meta_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.cost.complexity import cost
from vitscale.cost.measure import example_input
from vitscale.models import param_count, preset
from vitscale.models.layers import Attention

VARIANTS = [
    dict(pos_embed="sincos"),
    dict(pool="mean", class_token=False),
    dict(pool="mean", class_token=True, num_classes=0),
    dict(qkv_bias=False, mlp_ratio=2.5),
    dict(image_size=(48, 32)),
]
CONFIGS = [preset(n) for n in ALL_PRESETS] + [preset("pico/4", **v) for v in VARIANTS] + [
    preset("pico/4-f8t4", image_size=(32, 48), pos_embed="sincos", pool="mean", class_token=False)
]
IDS = [f"{c.width}x{c.depth}-{c.hw}-f{c.frames}t{c.tubelet}-{c.pos_embed}-{c.pool}" for c in CONFIGS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_params_match_the_built_model(cfg):
    assert cost(cfg).params == param_count(meta_model(cfg))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_flops_match_pytorch_flop_counter(cfg):
    # The math SDPA backend runs attention as two matmuls that the counter sees.
    model = meta_model(cfg)
    x = example_input(cfg, 1, "meta")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    c = cost(cfg)
    assert c.flops - c.bias_flops == counter.get_total_flops() // 2


def _hooked_acts(cfg) -> int:
    """pycls acts counted on a real forward pass: every conv/linear output, plus per
    attention layer its score maps (heads x L x L) and its output (L x D)."""
    model = meta_model(cfg)
    total = 0

    def count_output(_module, _inputs, out):
        nonlocal total
        total += out[0].numel()  # batch of one

    def count_attention(module, inputs, _out):
        nonlocal total
        _, L, D = inputs[0].shape
        total += module.heads * L * L + L * D

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            m.register_forward_hook(count_output)
        elif isinstance(m, Attention):
            m.register_forward_hook(count_attention)
    model(example_input(cfg, 1, "meta"))
    return total


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_acts_match_hooks_on_the_real_model(cfg):
    assert cost(cfg).acts == _hooked_acts(cfg)


# Published figures, 224 px, 1000 classes (DESIGN.md; timm / DeiT / pycls tables).
PUBLISHED = {
    "Ti/16": dict(params=5.72e6, flops=1.26e9),
    "S/16": dict(params=22.05e6, flops=4.61e9),
    "B/16": dict(params=86.57e6, flops=17.58e9, acts=23.9e6),
    "L/16": dict(params=304.33e6, flops=61.6e9),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_figures(name):
    c = cost(preset(name)).as_dict()
    for key, value in PUBLISHED[name].items():
        assert c[key] == pytest.approx(value, rel=0.005), key


def test_video_tokens_and_cost_grow_with_frames():
    image, video = cost(preset("S/16")), cost(preset("S/16-f16"))
    assert preset("S/16-f16").num_patches == 8 * 196
    assert video.flops > 8 * image.flops  # attention is quadratic in tokens


def test_relaxed_cost_equals_exact_cost_at_integers():
    cfg = preset("S/16")
    exact = cost(cfg.replace(width=448, heads=7, depth=14, image_size=256))
    relaxed = cost(cfg, width=448.0, depth=14.0, num_patches=256.0)
    assert relaxed.flops == pytest.approx(exact.flops, rel=1e-12)


def test_bias_flops_are_part_of_flops():
    with_bias, without = cost(preset("B/16")), cost(preset("B/16", qkv_bias=False))
    assert 0 < with_bias.bias_flops < 0.01 * with_bias.flops
    assert with_bias.flops - without.flops == 197 * 3 * 768 * 12
