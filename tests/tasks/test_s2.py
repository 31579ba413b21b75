"""S² (Scaling on Scales, issue 12): the multi-scale linear probe at scale 1 is the plain probe,
at scales 1,2 its feature is the hand computation (upsample, four tiles by slicing, encode each,
average, concatenate), its training FLOPs count the tiles' forwards, and bad scales are refused."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitscale import tasks
from vitscale.common.errors import UserError
from vitscale.common.records import apply_overrides
from vitscale.models.presets import preset
from vitscale.models.vit import ViT
from vitscale.tasks.probe import LinearProbe
from vitscale.train.config import RunConfig, TrainConfig
from vitscale.train.flops import train_flops_per_sample

TINY = preset("pico/4", image_size=8, num_classes=10, depth=2)


def probe_cfg(scales=(1,), model=TINY) -> RunConfig:
    return RunConfig(task="linprobe", model=model, train=TrainConfig(probe_scales=scales), init="random")


def with_stats(module: LinearProbe, seed: int = 0) -> LinearProbe:
    """Random running statistics and head, so that a wrong feature order or scale shows."""
    g = torch.Generator().manual_seed(seed)
    module.norm.running_mean.copy_(torch.randn(module.norm.running_mean.shape, generator=g))
    module.norm.running_var.copy_(torch.rand(module.norm.running_var.shape, generator=g) + 0.5)
    module.head.weight.data.copy_(torch.randn(module.head.weight.shape, generator=g))
    return module.eval()


def by_hand(module: LinearProbe, features: torch.Tensor) -> torch.Tensor:
    """The plain probe's evaluation: features normalised by the running statistics, then the head."""
    n = module.norm
    return module.head(F.batch_norm(features, n.running_mean, n.running_var, eps=n.eps))


def test_scale_one_is_the_plain_probe():
    torch.manual_seed(0)
    module = with_stats(tasks.build(probe_cfg((1,)), 10))
    assert module.head.in_features == TINY.width and module.norm.running_mean.shape == (TINY.width,)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(module.predict(x), by_hand(module, module.vit(x)))
    torch.manual_seed(0)
    default = tasks.build(RunConfig(task="linprobe", model=TINY, init="random"), 10)  # no probe_scales given
    a, b = default.state_dict(), tasks.build(probe_cfg((1,)), 10).state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_scales_one_two_concatenate_the_image_and_its_four_upsampled_tiles():
    torch.manual_seed(1)
    module = with_stats(tasks.build(probe_cfg((1, 2)), 10), seed=1)
    assert module.head.in_features == 2 * TINY.width
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        up = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
        tiles = [module.vit(up[:, :, i:i + 8, j:j + 8]) for i in (0, 8) for j in (0, 8)]  # 4 x [3, D]
        expected = torch.cat([module.vit(x), torch.stack(tiles).mean(0)], -1)  # [3, 2D]
        torch.testing.assert_close(module.predict(x), by_hand(module, expected), rtol=1e-5, atol=1e-5)
        # the tiles are not interchangeable with the base image: the second half is its own feature
        assert not torch.allclose(expected[:, TINY.width:], expected[:, :TINY.width], atol=1e-3)


def test_training_flops_count_one_plus_four_encoder_forwards():
    with torch.device("meta"):  # as train_flops_per_sample counts
        vit, x = ViT(TINY.replace(num_classes=0)).eval(), torch.randn(2, 3, 8, 8)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vit(x)
    encoder = counter.get_total_flops() / 2 / 2  # multiply-adds per sample
    head = 2 * 10  # per feature channel: the head's forward and its weight gradient (frozen features)
    one = train_flops_per_sample(probe_cfg((1,)), 10)
    assert one == encoder + head * TINY.width
    assert train_flops_per_sample(probe_cfg((1, 2)), 10) == 5 * encoder + head * 2 * TINY.width
    assert train_flops_per_sample(probe_cfg((1, 3)), 10) == 10 * encoder + head * 2 * TINY.width


def test_probe_scales_from_the_command_line_and_refusals():
    cfg = apply_overrides(probe_cfg(), ["train.probe_scales=1,2"])
    assert cfg.train.probe_scales == (1, 2)
    for bad in ("0,1", "1,1", "2,-1"):
        with pytest.raises(UserError, match="train.probe_scales"):
            apply_overrides(probe_cfg(), [f"train.probe_scales={bad}"])
    video = preset("pico/4", image_size=8, num_classes=10, depth=1, frames=4, tubelet=2)
    with pytest.raises(UserError, match="train.probe_scales"):
        tasks.build(probe_cfg((1, 2), model=video), 10)
