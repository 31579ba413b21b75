"""MAE / VideoMAE: patch order, masking, the masked loss, what the encoder sees, pictures."""

import pytest
import torch

from vitscale.cost.measure import example_input
from vitscale.models.mae import (
    MAE,
    MAEConfig,
    grid_of,
    normalize_patches,
    patchify,
    random_masking,
    tube_masking,
    unpatchify,
)
from vitscale.models.presets import preset
from vitscale.models.vit import PatchEmbed, ViT

IMAGE = preset("pico/4")  # 32 px, 8x8 = 64 tokens, cls token
VIDEO = preset("pico/4-f8", class_token=False, pool="mean")  # 8 frames, tubelet 2: 4x8x8 = 256 tokens
SMALL_DECODER = dict(decoder_width=32, decoder_depth=2, decoder_heads=2)


def small_mae(cfg=IMAGE, **overrides) -> MAE:
    mae = dict(SMALL_DECODER, masking="tube", mask_ratio=0.9) if cfg.is_video else dict(SMALL_DECODER)
    return MAE(cfg, MAEConfig(**(mae | overrides)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def patch_mask(cfg, mask: torch.Tensor) -> torch.Tensor:
    """[B, N] token mask -> input-shaped 0/1 mask covering each masked patch."""
    return unpatchify(mask[..., None].expand(-1, -1, cfg.patch_dim), cfg, cfg.grid)


# ----------------------------------------------------------------------------- patches
@pytest.mark.parametrize("cfg", [IMAGE, VIDEO, preset("pico/4", image_size=(16, 24)),
                                 preset("pico/4-f8t4", in_chans=1)])
def test_patchify_round_trip_is_exact(cfg):
    x = example_input(cfg, 3)
    patches = patchify(x, cfg)
    assert patches.shape == (3, cfg.num_patches, cfg.patch_dim)
    assert torch.equal(unpatchify(patches, cfg, grid_of(x, cfg)), x)


@pytest.mark.parametrize("cfg", [IMAGE, VIDEO, preset("pico/4-f8t4", image_size=(16, 24))])
def test_patchify_token_order_matches_patch_embed(cfg):
    """A patch embedding whose kernel selects one input value per output channel, in the
    (tubelet, p, p, C) order, must output exactly patchify's rows."""
    P, u, p, C = cfg.patch_dim, cfg.tubelet, cfg.patch_size, cfg.in_chans
    embed = PatchEmbed(cfg.replace(width=P))
    selector = torch.eye(P).reshape(P, u, p, p, C).permute(0, 4, 1, 2, 3)  # [D, C, u, p, p]
    with torch.no_grad():
        embed.proj.weight.copy_(selector if cfg.is_video else selector[:, :, 0])
        embed.proj.bias.zero_()
    x = example_input(cfg, 2)
    tokens, grid = embed(x)
    assert grid == cfg.grid
    torch.testing.assert_close(tokens, patchify(x, cfg), rtol=0, atol=1e-6)


def test_normalized_patches_have_zero_mean_unit_variance_and_invert():
    patches = torch.randn(2, 5, 48) * 3 + 7
    norm, mean, std = normalize_patches(patches)
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.var(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm * std + mean, patches)


# ----------------------------------------------------------------------------- masking
def test_random_masking_keeps_the_right_count_consistently():
    B, N, ratio = 8, 64, 0.75
    keep, mask, restore = random_masking(B, N, ratio, gen())
    assert keep.shape == (B, 16) and mask.shape == (B, N)
    assert torch.equal(mask.sum(1), torch.full((B,), 48.0))  # exactly ratio * N masked per sample
    assert torch.equal(mask.gather(1, keep), torch.zeros(B, 16))  # kept tokens are the visible ones
    assert all(len(set(row.tolist())) == 16 for row in keep)  # no duplicates
    assert len({tuple(row.tolist()) for row in mask}) == B  # a different mask per sample


def test_random_masking_restore_is_the_inverse_of_the_shuffle():
    keep, mask, restore = random_masking(4, 20, 0.5, gen(1))
    shuffle = restore.argsort(dim=1)  # the permutation restore undoes: visible ids first
    assert torch.equal(shuffle.gather(1, restore), torch.arange(20).expand(4, 20))
    assert torch.equal(shuffle[:, :10], keep)
    assert torch.equal(mask.gather(1, shuffle), torch.cat([torch.zeros(4, 10), torch.ones(4, 10)], 1))


def test_masking_uses_the_generator_or_the_global_rng_alike():
    torch.manual_seed(3)
    from_global = random_masking(2, 16, 0.5)
    from_gen = random_masking(2, 16, 0.5, gen(3))
    assert all(torch.equal(a, b) for a, b in zip(from_global, from_gen, strict=True))
    assert not torch.equal(from_gen.mask, random_masking(2, 16, 0.5, gen(4)).mask)


def test_tube_masking_masks_the_same_places_in_every_frame():
    B, grid = 6, (4, 8, 8)
    keep, mask, restore = tube_masking(B, grid, 0.9, gen())
    frames = mask.reshape(B, 4, 64)
    assert torch.equal(frames, frames[:, :1].expand(-1, 4, -1))
    assert torch.equal(frames[:, 0].sum(1), torch.full((B,), 58.0))  # round(0.1 * 64) = 6 visible
    assert keep.shape == (B, 4 * 6)
    assert torch.equal(mask.gather(1, keep), torch.zeros(B, 24))
    assert len({tuple(row.tolist()) for row in frames[:, 0]}) == B
    shuffle = restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :24], keep)


@pytest.mark.parametrize("bad", [dict(mask_ratio=0.0), dict(mask_ratio=1.0), dict(masking="block"),
                                 dict(decoder_width=100, decoder_heads=16),
                                 dict(decoder_width=30, decoder_heads=3)])
def test_bad_mae_configs_say_what_is_wrong(bad):
    with pytest.raises(ValueError, match="mae\\."):
        MAEConfig(**bad)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("cfg", [IMAGE, VIDEO])
def test_encoder_sees_only_the_visible_tokens(cfg):
    model = small_mae(cfg)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = example_input(cfg, 2)
    _, pred, mask = model(x, gen())
    visible = int((1 - mask[0]).sum())
    assert seen == [visible + cfg.num_prefix]
    assert visible == (16 if cfg is IMAGE else 24)
    assert pred.shape == (2, cfg.num_patches, cfg.patch_dim)


@pytest.mark.parametrize("cfg", [IMAGE, VIDEO])
def test_unshuffle_puts_visible_tokens_in_place_and_mask_tokens_elsewhere(cfg):
    model, B, P = small_mae(cfg), 3, cfg.num_prefix
    keep, mask, restore = model.make_mask(B, cfg.grid, torch.device("cpu"), gen())
    tokens = torch.randn(B, P + keep.shape[1], 32)
    out = model.unshuffle(tokens, restore)  # [B, P + N, 32]
    assert out.shape == (B, P + cfg.num_patches, 32)
    assert torch.equal(out[:, :P], tokens[:, :P])  # the cls token stays first
    patches = out[:, P:]
    assert torch.equal(patches.gather(1, keep[..., None].expand(-1, -1, 32)), tokens[:, P:])
    assert torch.equal(patches[mask.bool()], model.mask_token[0].expand(int(mask.sum()), 32))


@pytest.mark.parametrize("cfg", [IMAGE, VIDEO])
def test_prediction_ignores_masked_pixels_and_loss_is_on_masked_patches(cfg):
    model = small_mae(cfg).eval()
    x = example_input(cfg, 2)
    loss, pred, mask = model(x, gen())
    cover = patch_mask(cfg, mask)
    # Changing pixels the encoder cannot see leaves the prediction as it was ...
    loss_m, pred_m, _ = model(x + 5 * torch.randn_like(x) * cover, gen())
    torch.testing.assert_close(pred_m, pred, rtol=0, atol=0)
    assert not torch.isclose(loss_m, loss)  # ... but changes the targets of the loss
    # Changing visible pixels changes the prediction.
    _, pred_v, _ = model(x + torch.randn_like(x) * (1 - cover), gen())
    assert not torch.allclose(pred_v, pred)
    # The loss is the MSE to per-patch normalised pixels over masked patches, by hand:
    target = patchify(x, cfg)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    err = ((pred - target) ** 2).mean(-1)  # [B, N]
    torch.testing.assert_close(loss, err[mask.bool()].mean())
    # and the loss does not move when only visible targets change
    noisy = patchify(x, cfg) + torch.randn_like(target) * (1 - mask[..., None])
    torch.testing.assert_close(model.loss(noisy, pred, mask), loss)


def test_raw_pixel_loss_without_norm_pix():
    model = small_mae(norm_pix_loss=False)
    x = example_input(IMAGE, 2)
    loss, pred, mask = model(x, gen())
    err = ((pred - patchify(x, IMAGE)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (err * mask).sum() / mask.sum())


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("cfg", [IMAGE, VIDEO])
def test_reconstruction_of_a_perfect_predictor_is_the_input(cfg, norm_pix, monkeypatch):
    model = small_mae(cfg, norm_pix_loss=norm_pix)
    x = example_input(cfg, 2) * 0.25 + 0.4  # not zero-mean, so un-normalising matters
    target = patchify(x, cfg)
    perfect = normalize_patches(target)[0] if norm_pix else target
    monkeypatch.setattr(model, "decode", lambda tokens, grid: perfect)
    pictures = model.reconstruct(x, gen())
    assert {k: v.shape for k, v in pictures.items()} == dict.fromkeys(
        ("original", "masked", "reconstruction"), x.shape)
    torch.testing.assert_close(pictures["reconstruction"], x, atol=1e-5, rtol=1e-5)
    assert torch.equal(pictures["original"], x)
    _, _, mask = model(x, gen())
    cover = patch_mask(cfg, mask)
    assert torch.equal(pictures["masked"], x * (1 - cover))


def test_encoder_with_mask_tokens_on_all_tokens():
    model = small_mae(encoder_on_all_tokens=True).eval()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    x = example_input(IMAGE, 2)
    loss, pred, mask = model(x, gen())
    assert seen == [IMAGE.num_patches + 1] and pred.shape == (2, 64, 48)
    # masked patches are replaced by the mask token before the encoder
    _, pred_m, _ = model(x + torch.randn_like(x) * patch_mask(IMAGE, mask), gen())
    torch.testing.assert_close(pred_m, pred, rtol=0, atol=0)


@pytest.mark.parametrize("cfg,overrides", [(IMAGE, {}), (VIDEO, {}),
                                           (IMAGE, dict(encoder_on_all_tokens=True))])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(cfg, overrides):
    torch.manual_seed(0)
    model = small_mae(cfg, **overrides)
    x = example_input(cfg, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(x, gen())[0]  # the same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_video_forward_in_bf16_autocast():
    model = small_mae(VIDEO)
    x = example_input(VIDEO, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(x)
    loss.backward()
    assert torch.isfinite(loss) and mask.shape == (2, 256) and pred.shape == (2, 256, 96)


def test_encoder_weights_load_into_a_classifier():
    model = small_mae()
    vit = ViT(IMAGE)
    result = vit.load_state_dict(model.encoder.state_dict(), strict=False)
    assert result.missing_keys == ["head.weight", "head.bias"] and not result.unexpected_keys
