"""Scaling strategies: parsing, hitting the flops target, valid rounding, growth exponents."""

import pytest

from vitscale.cost.complexity import cost
from vitscale.cost.scaling import growth_exponent, parse_strategy, scale, scale_family
from vitscale.models import preset

STRATEGIES = ["d", "w", "r", "dw", "dwr", "d1_w8_r1"]
FACTORS = [2, 4, 8, 16]


def test_parse_strategy():
    assert parse_strategy("d") == {"d": 1.0}
    assert parse_strategy("dwr") == pytest.approx({"d": 1 / 3, "w": 1 / 3, "r": 1 / 3})
    assert parse_strategy("d1_w8_r1") == pytest.approx({"d": 0.1, "w": 0.8, "r": 0.1})
    assert parse_strategy("d2_w6_r1_t1") == pytest.approx({"d": 0.2, "w": 0.6, "r": 0.1, "t": 0.1})


@pytest.mark.parametrize("bad", ["", "x", "dd", "d1_w", "d1w8", "d1_d2", "d0_w0", "wdx"])
def test_bad_strategy_strings(bad):
    with pytest.raises(ValueError, match="strategy"):
        parse_strategy(bad)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_s16_family_hits_the_target_within_5_percent(strategy):
    base = preset("S/16")
    for member in scale_family(base, strategy, FACTORS):
        assert abs(member.error) < 0.05, (strategy, member.target, member.achieved)
        assert member.achieved == pytest.approx(cost(member.config).flops / cost(base).flops)


CASES = [(b, s) for b in ["pico/4", "Ti/16"] for s in STRATEGIES] + [
    ("S/16-f16", s) for s in STRATEGIES + ["t", "dt", "d1_w8_r1_t1"]]


@pytest.mark.parametrize(("base_name", "strategy"), CASES)
def test_scaled_configs_are_valid_and_move_only_their_dimensions(base_name, strategy):
    base = preset(base_name)
    shares = parse_strategy(strategy)
    for member in scale_family(base, strategy, [2, 4, 8]):
        c = member.config
        assert c.width % c.heads == 0 and (c.width // c.heads) % 8 == 0
        assert c.hw[0] % c.patch_size == 0 and c.frames % c.tubelet == 0
        assert member.achieved > 1
        for dim, value, base_value in [("d", c.depth, base.depth), ("w", c.width, base.width),
                                       ("r", c.hw, base.hw), ("t", c.frames, base.frames)]:
            if dim not in shares:
                assert value == base_value, dim


def test_scale_is_pure_and_factor_one_is_the_base():
    base = preset("S/16")
    assert scale(base, "dwr", 4) == scale(base, "dwr", 4)
    assert scale(base, "dwr", 1) == base


def test_frames_need_a_video_base():
    with pytest.raises(ValueError, match="image model"):
        scale(preset("S/16"), "t", 2)
    assert scale(preset("S/16-f16"), "t", 2).frames > 16


def test_depth_scaling_is_exact_where_depth_allows():
    assert scale(preset("S/16"), "d", 2).depth == 24


def test_growth_exponents_follow_the_paper_with_attention_on_top():
    """Dollar et al.: acts grow ~s for d and r, ~sqrt(s) for w, close to sqrt(s) for d1_w8_r1.
    For a ViT, r grows faster than linear: attention maps grow with tokens squared."""
    base = preset("S/16")
    e = {s: growth_exponent(scale_family(base, s, [1, 2, 4, 8, 16])) for s in STRATEGIES}
    assert e["d"] == pytest.approx(1.0, abs=0.03)
    assert e["w"] == pytest.approx(0.5, abs=0.06)
    assert e["r"] > 1.1
    assert e["w"] < e["d1_w8_r1"] < e["dwr"] < e["d"]
    assert e["d1_w8_r1"] < 0.75
