"""The ViT: shapes for every preset, video embedding, resampling, keep-indices."""

import pytest
import torch
from conftest import ALL_PRESETS, meta_model

from vitscale.cost.measure import example_input
from vitscale.models import ViT, ViTConfig, preset
from vitscale.models.layers import resample_pos_embed, sincos_pos_embed


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_builds_and_runs(name):
    cfg = preset(name)
    out = meta_model(cfg)(example_input(cfg, 2, "meta"))
    assert out.shape == (2, cfg.num_classes)


@pytest.mark.parametrize("name", ["pico/4", "pico/4-f8", "mu/4"])
def test_small_presets_run_for_real_and_backprop(name):
    cfg = preset(name, drop_path=0.1)
    model = ViT(cfg)
    out = model(example_input(cfg, 2))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


def test_preset_decoding():
    cfg = preset("B/16")
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.hw) == (768, 12, 12, 16, (224, 224))
    video = preset("S/16-f16")
    assert (video.frames, video.tubelet, video.grid) == (16, 2, (8, 14, 14))
    assert preset("pico/4-f8t4").tubelet == 4
    assert preset("B/16", image_size=384).grid == (1, 24, 24)


@pytest.mark.parametrize("name", ["X/16", "B/x", "B", "B/16-16", "B/16-fx"])
def test_bad_preset_names(name):
    with pytest.raises(ValueError, match="preset|suffix"):
        preset(name)


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(width=65), dict(frames=3, tubelet=2),
                                 dict(pool="cls", class_token=False), dict(pool="max")])
def test_bad_configs_say_what_is_wrong(bad):
    with pytest.raises(ValueError):
        preset("pico/4", **bad)


def test_frames_one_is_the_image_model():
    image = ViT(preset("pico/4"))
    single = ViT(preset("pico/4-f1t1"))
    assert {k: v.shape for k, v in image.state_dict().items()} == {
        k: v.shape for k, v in single.state_dict().items()}
    single.load_state_dict(image.state_dict())
    x = example_input(image.cfg, 2)
    torch.testing.assert_close(single(x), image(x), rtol=0, atol=0)


def test_tubelet_embedding_is_a_linear_map_of_each_tubelet():
    cfg = preset("pico/4-f4", in_chans=3)  # tubelet 2, patch 4
    model = ViT(cfg)
    x = example_input(cfg, 1)  # [1, C, T, H, W]
    tokens, grid = model.patch_embed(x)
    t, h, w = grid
    # Independent reference: cut out tubelet (ti, hi, wi) and apply the kernel as a matrix.
    W = model.patch_embed.proj.weight.reshape(cfg.width, -1)
    b = model.patch_embed.proj.bias
    ti, hi, wi = 1, 3, 5
    cube = x[0, :, 2 * ti:2 * ti + 2, 4 * hi:4 * hi + 4, 4 * wi:4 * wi + 4].reshape(-1)
    torch.testing.assert_close(tokens[0, (ti * h + hi) * w + wi], W @ cube + b)


@pytest.mark.parametrize("grid", [(1, 8, 8), (4, 8, 6)])
def test_resampling_to_the_same_grid_is_the_identity_through_interpolation(grid):
    pos = torch.randn(1, grid[0] * grid[1] * grid[2], 16)
    same = resample_pos_embed(pos, grid, (grid[0] * 2, grid[1] * 2, grid[2] * 2))
    back = resample_pos_embed(same, (grid[0] * 2, grid[1] * 2, grid[2] * 2), grid)
    assert back.shape == pos.shape
    assert torch.equal(resample_pos_embed(pos, grid, grid), pos)
    # bicubic / linear with align_corners=False at scale 1 puts all weight on the source point
    x = pos.reshape(*grid, 16).permute(0, 3, 1, 2)
    direct = torch.nn.functional.interpolate(x, size=grid[1:], mode="bicubic", align_corners=False)
    torch.testing.assert_close(direct, x, rtol=0, atol=1e-6)


def test_resampling_keeps_a_smooth_embedding_smooth():
    # A plane in (row, col) resampled from 8x8 to 16x16 stays nearly that plane inside the grid
    # (PyTorch's bicubic, a = -0.75, reproduces a ramp only approximately; a swapped axis or a
    # misplaced sample would miss by whole units).
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    plane = (0.5 * rows + 0.25 * cols).reshape(1, 64, 1)
    up = resample_pos_embed(plane, (1, 8, 8), (1, 16, 16)).reshape(16, 16)
    centres = (torch.arange(16.0) + 0.5) / 2 - 0.5  # source coordinate of each new cell
    expected = 0.5 * centres[:, None] + 0.25 * centres[None, :]
    torch.testing.assert_close(up[3:-3, 3:-3], expected[3:-3, 3:-3], atol=0.05, rtol=0)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_model_runs_at_a_new_resolution_and_frame_count(pos_embed):
    cfg = preset("pico/4-f8", pos_embed=pos_embed)
    model = ViT(cfg).eval()
    assert model(torch.randn(2, 3, 4, 48, 40)).shape == (2, 10)
    x = example_input(cfg, 2)
    # Same grid: the resampled table is the stored one.
    torch.testing.assert_close(model.pos_embed_for(cfg.grid), model.pos_embed, rtol=0, atol=0)
    assert model(x).shape == (2, 10)


def test_sincos_is_mae_2d_form_for_images():
    pos = sincos_pos_embed(8, (1, 2, 3))  # [6, 8]: cols then rows (MAE's released order), each sin | cos
    assert pos.shape == (6, 8)
    assert torch.equal(pos[:, 0], torch.tensor([0.0, 1, 2, 0, 1, 2]).sin())  # col index, freq 1
    assert torch.equal(pos[:, 4], torch.tensor([0.0, 0, 0, 1, 1, 1]).sin())  # row index, freq 1


def test_keep_indices_encode_only_those_tokens():
    cfg = preset("pico/4")
    model = ViT(cfg).eval()
    x = example_input(cfg, 2)
    full = model.forward_features(x)  # [2, 65, D]
    perm = torch.stack([torch.randperm(64), torch.randperm(64)])
    shuffled = model.forward_features(x, keep=perm)
    # Attention is permutation-equivariant and positions are added before the gather.
    torch.testing.assert_close(shuffled[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    expected = torch.gather(full[:, 1:], 1, perm[..., None].expand(-1, -1, 64))
    torch.testing.assert_close(shuffled[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert model.forward_features(x, keep=perm[:, :16]).shape == (2, 17, cfg.width)


def test_mean_pool_without_cls_and_features_only():
    cfg = preset("pico/4", pool="mean", class_token=False, num_classes=0)
    model = ViT(cfg).eval()
    x = example_input(cfg, 3)
    feats = model(x)
    assert feats.shape == (3, cfg.width)
    # The mean of the last block's tokens, then the final norm (timm's fc_norm).
    torch.testing.assert_close(feats, model.norm(model.forward_features(x, norm=False).mean(1)))


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = ViT(preset("pico/4", drop_path=0.5))
    x = example_input(model.cfg, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ViTConfig().width = 1  # type: ignore[misc]
