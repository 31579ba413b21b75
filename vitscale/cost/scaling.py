"""Model scaling strategies for ViTs, after Dollar, Singh, Girshick 2021.

A strategy string names the dimensions that grow and their share of the flops increase,
as pycls writes them: `d` (depth), `w` (width), `r` (resolution), `t` (frames, video
only), unweighted (`dw`, `dwr`: equal shares) or weighted (`d1_w8_r1`: fast compound
scaling, alpha = 0.8 of the growth to width). For a CNN, flops ~ d * w^2 * r^2, so scaling
flops by s gives d * s^e_d, w * s^(e_w/2), r * s^(e_r/2). A ViT's attention grows with the
square of the token count, so here the same exponents define a path u -> (d, w, r, t) and
the scaler solves for the point on it whose real flops (complexity.cost) are s times the
base's, then rounds to a valid config: integer depth, heads dividing width with a head
dimension that is a multiple of 8, resolution a multiple of the patch size, frames a
multiple of the tubelet. The achieved factor is always reported.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from vitscale.common.errors import UserError
from vitscale.common.stats import loglog_slope
from vitscale.cost.complexity import Cost, cost
from vitscale.models.vit import ViTConfig

DIMS = "dwrt"
FLOPS_SLACK = 0.02  # roundings this close (in log flops) to the best one count as ties
_WEIGHTED = re.compile(r"^([dwrt])(\d+(?:\.\d+)?)$")


def parse_strategy(strategy: str) -> dict[str, float]:
    """Strategy string -> flops share per dimension, summing to 1.

    >>> parse_strategy("d1_w8_r1")
    {'d': 0.1, 'w': 0.8, 'r': 0.1}
    """
    if "_" in strategy or any(c.isdigit() for c in strategy):
        parts = [_WEIGHTED.match(p) for p in strategy.split("_")]
        weights = {m.group(1): float(m.group(2)) for m in parts if m}
        ok = all(parts) and len(weights) == len(parts)
    else:
        weights = {c: 1.0 for c in strategy}
        ok = len(weights) == len(strategy) and set(strategy) <= set(DIMS)
    total = sum(weights.values())
    if not strategy or not ok or total <= 0:
        raise UserError(
            f"bad strategy {strategy!r}; use letters from d, w, r, t (e.g. d, w, dwr) "
            "or weighted parts like d1_w8_r1"
        )
    return {k: v / total for k, v in weights.items() if v > 0}


@dataclass(frozen=True)
class Scaled:
    """One member of a scaled family."""

    strategy: str
    target: float  # requested flops factor
    config: ViTConfig
    cost: Cost
    achieved: float  # real flops factor over the base

    @property
    def error(self) -> float:
        """Relative miss of the target flops factor."""
        return self.achieved / self.target - 1.0


def _ideal(base: ViTConfig, shares: dict[str, float], u: float) -> dict[str, float]:
    """Continuous dimensions at path position u (u = s for a CNN's exact d*w^2*r^2 law)."""
    h, w = base.hw
    r = u ** (shares.get("r", 0.0) / 2)
    return {
        "depth": base.depth * u ** shares.get("d", 0.0),
        "width": base.width * u ** (shares.get("w", 0.0) / 2),
        "height": h * r,
        "wide": w * r,
        "frames": base.frames * u ** shares.get("t", 0.0),
    }


def _relaxed_flops(base: ViTConfig, dims: dict[str, float]) -> float:
    """Flops of the continuous dimensions (token counts and depth need not be integers)."""
    p = base.patch_size
    patches = (dims["frames"] / base.tubelet) * (dims["height"] / p) * (dims["wide"] / p)
    return cost(base, width=dims["width"], depth=dims["depth"], num_patches=patches).flops


def _solve(base: ViTConfig, shares: dict[str, float], factor: float) -> dict[str, float]:
    """Bisect on log u for the path point whose relaxed flops are factor x the base's."""
    target = factor * cost(base).flops
    lo, hi = -30.0, 30.0  # log u; flops grow monotonically along the path
    for _ in range(100):
        mid = (lo + hi) / 2
        if _relaxed_flops(base, _ideal(base, shares, math.exp(mid))) < target:
            lo = mid
        else:
            hi = mid
    return _ideal(base, shares, math.exp((lo + hi) / 2))


def _near_multiples(x: float, step: int) -> set[int]:
    """The multiples of `step` just below and above x (at least `step`)."""
    return {max(step, step * math.floor(x / step)), max(step, step * math.ceil(x / step))}


def _width_options(base: ViTConfig, width: float) -> set[tuple[int, int]]:
    """(width, heads) pairs near `width`: head dim a multiple of 8, within 2x of the base's."""
    head_dim = base.width // base.heads
    quantum = 8 if head_dim % 8 == 0 else 1
    guess = max(1, round(width / head_dim))
    options = set()
    for heads in range(max(1, guess - 3), guess + 4):
        for w in _near_multiples(width, heads * quantum):
            if head_dim / 2 <= w / heads <= head_dim * 2:  # keep heads near the base's size
                options.add((w, heads))
    return options


def _candidates(base: ViTConfig, shares: dict[str, float], ideal: dict[str, float]):
    """Valid configs around the continuous solution; fixed dimensions stay as they are."""
    h, w = base.hw
    p, depth = base.patch_size, ideal["depth"]
    depths = {max(1, math.floor(depth)), max(1, math.ceil(depth))} if "d" in shares else {base.depth}
    widths = _width_options(base, ideal["width"]) if "w" in shares else {(base.width, base.heads)}
    sizes = {(base.image_size, h)}
    if "r" in shares:
        sizes = set()
        for hh in _near_multiples(ideal["height"], p):
            ww = p * max(1, round(hh * w / (h * p)))  # keep the aspect ratio
            sizes.add((hh if hh == ww else (hh, ww), hh))
    frames = _near_multiples(ideal["frames"], base.tubelet) if "t" in shares else {base.frames}
    for d, (wd, heads), (size, _), f in itertools.product(depths, widths, sizes, frames):
        yield base.replace(depth=d, width=wd, heads=heads, image_size=size, frames=f)


def _shape_distance(cfg: ViTConfig, ideal: dict[str, float]) -> float:
    """How far a rounded config strays from the strategy's continuous proportions."""
    pairs = [(cfg.depth, ideal["depth"]), (cfg.width, ideal["width"]),
             (cfg.hw[0], ideal["height"]), (cfg.frames, ideal["frames"]),
             (cfg.width / cfg.heads, ideal["head_dim"])]
    return sum(abs(math.log(a / b)) for a, b in pairs)


def scale(config: ViTConfig, strategy: str, factor: float) -> ViTConfig:
    """The config `strategy` reaches from `config` at `factor` x its flops (a pure function).

    Among the valid roundings of the continuous solution, those within FLOPS_SLACK of the
    best achievable flops are equally good; of these it takes the one closest to the
    strategy's proportions (and to the base's head dimension).
    """
    if not (math.isfinite(factor) and factor > 0):
        raise UserError(f"scaling factors must be finite positive numbers, got {factor}")
    shares = parse_strategy(strategy)
    if "t" in shares and not config.is_video:
        raise UserError(f"strategy {strategy!r} scales frames (t) but the base is an image model; "
                         "use a video preset such as S/16-f16")
    if factor == 1:
        return config
    ideal = _solve(config, shares, factor) | {"head_dim": config.width / config.heads}
    target = factor * cost(config).flops
    misses = {cfg: abs(math.log(cost(cfg).flops / target)) for cfg in _candidates(config, shares, ideal)}
    if not misses:  # e.g. a width below one head of the base's head dimension
        raise UserError(f"strategy {strategy!r} cannot reach {factor:g}x the flops of the base; "
                        "use a factor nearer 1")
    good_enough = min(misses.values()) + FLOPS_SLACK
    return min((c for c, m in misses.items() if m <= good_enough), key=lambda c: _shape_distance(c, ideal))


def scale_family(config: ViTConfig, strategy: str, factors: list[float]) -> list[Scaled]:
    """Scale `config` by each factor and record the achieved flops factor."""
    base_flops = cost(config).flops
    family = []
    for f in factors:
        cfg = scale(config, strategy, f)
        c = cost(cfg)
        family.append(Scaled(strategy, f, cfg, c, c.flops / base_flops))
    return family


def growth_exponent(family: list[Scaled], y: str = "acts") -> float:
    """Log-log least-squares slope of a cost (`acts` or `params`) against flops."""
    return loglog_slope([s.cost.flops for s in family], [getattr(s.cost, y) for s in family])
