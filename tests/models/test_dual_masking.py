"""VideoMAE V2 dual masking: the running-cell decoder mask and a loss on the decoded masked tokens only."""

import pytest
import torch

from vitscale.common.errors import UserError
from vitscale.cost.measure import example_input
from vitscale.models.mae import MAE, MAEConfig, decoder_keep, patchify, running_cell_mask, unpatchify
from vitscale.models.presets import preset

VIDEO = preset("pico/4-f8", class_token=False, pool="mean")  # 4x8x8 = 256 tokens
IMAGE = preset("pico/4")  # 8x8 = 64 tokens, cls token
SMALL = dict(decoder_width=32, decoder_depth=2, decoder_heads=2)


def model(cfg=VIDEO, **overrides) -> MAE:
    base = dict(SMALL, masking="tube", mask_ratio=0.9) if cfg.is_video else dict(SMALL)
    torch.manual_seed(0)
    return MAE(cfg, MAEConfig(**(base | overrides))).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_cell_mask(start: int, t: int, h: int, w: int, dropped: int) -> torch.Tensor:
    """The running cell by its definition, one position at a time: in frame f the pointer is
    start + f + 1, and cell slot s (raster order in the 2x2 cell) is dropped when
    (pointer + s) mod 4 < dropped."""
    out = torch.zeros(t, h, w)
    for f in range(t):
        for i in range(h):
            for j in range(w):
                out[f, i, j] = float((start + f + 1 + 2 * (i % 2) + (j % 2)) % 4 < dropped)
    return out.flatten()


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_masks_have_the_right_counts_and_run_over_frames(ratio):
    t, h, w = 5, 6, 4
    m = running_cell_mask(64, (t, h, w), ratio, gen(1))  # [B, N]
    cells = m.reshape(64, t, h // 2, 2, w // 2, 2).sum(dim=(3, 5))  # [B, t, cells, cells]
    assert torch.all(cells == round(4 * ratio))  # every 2x2 cell of every frame drops exactly 4r
    starts = set()
    for row in m:  # each sample is the definition's mask for one of the 4 starts
        match = [s for s in range(4) if torch.equal(row, reference_cell_mask(s, t, h, w, round(4 * ratio)))]
        assert len(match) == 1
        starts |= set(match)
    assert starts == {0, 1, 2, 3}  # all starts occur in 64 draws
    # over any 4 consecutive frames each position is dropped exactly 4r times
    assert torch.all(m.reshape(64, t, h * w)[:, :4].sum(1) == round(4 * ratio))


def test_running_cell_and_decoder_keep_are_deterministic_under_a_generator():
    a = running_cell_mask(8, (4, 8, 8), 0.5, gen(3))
    torch.testing.assert_close(a, running_cell_mask(8, (4, 8, 8), 0.5, gen(3)), rtol=0, atol=0)
    mask = (torch.rand(8, 256, generator=gen(0)).argsort(1) < 230).float()  # 230 masked per row
    k1, k2 = decoder_keep(mask, 115, a, gen(5)), decoder_keep(mask, 115, a, gen(5))
    torch.testing.assert_close(k1, k2, rtol=0, atol=0)
    assert not torch.equal(k1, decoder_keep(mask, 115, a, gen(6)))


def test_decoder_keep_takes_masked_tokens_the_cell_keeps_first():
    mask = (torch.rand(16, 256, generator=gen(0)).argsort(1) < 230).float()
    drop = running_cell_mask(16, (4, 8, 8), 0.5, gen(1))
    for count in (50, 115, 200):
        ids = decoder_keep(mask, count, drop, gen(2))  # [B, count]
        chosen = torch.zeros_like(mask).scatter(1, ids, 1.0)
        assert ids.shape == (16, count) and torch.all(chosen.sum(1) == count)
        assert torch.all(chosen <= mask)  # only masked tokens
        kept_masked = (mask * (1 - drop)).sum(1)  # masked tokens the cell keeps, per sample
        # all of those (when count allows) and only those (when they are enough)
        assert torch.all((chosen * mask * (1 - drop)).sum(1) == torch.clamp(kept_masked, max=count))


def test_dual_masking_loss_covers_exactly_the_decoded_masked_tokens():
    m = model(decoder_mask_ratio=0.5)
    x = example_input(VIDEO, 2)
    loss, pred, seen = m(x, gen())
    enc_mask = m.make_mask(2, VIDEO.grid, x.device, gen()).mask  # the same first draw
    assert torch.all(seen <= enc_mask)  # decoded tokens are masked ones
    assert torch.all(seen.sum(1) == 116)  # 4 x 58 = 232 masked, half of them decoded
    assert torch.all(pred[seen == 0] == 0)  # no prediction elsewhere
    # By hand: MSE to per-patch normalised pixels, mean over exactly the decoded tokens
    target = patchify(x, VIDEO)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    err = ((pred - target) ** 2).mean(-1)  # [B, N]
    torch.testing.assert_close(loss, err[seen.bool()].mean())
    # Perturbing a target: at a dropped masked token (and a visible one) the loss stays,
    # at a decoded masked one it moves.
    raw = patchify(x, VIDEO)
    dropped = (enc_mask - seen)[0].nonzero()[0, 0]
    visible = (1 - enc_mask)[0].nonzero()[0, 0]
    decoded = seen[0].nonzero()[0, 0]
    for pos, moves in ((dropped, False), (visible, False), (decoded, True)):
        noisy = raw.clone()
        noisy[0, pos] += torch.randn(raw.shape[-1], generator=gen(9))
        assert torch.equal(m.loss(noisy, pred, seen), loss) != moves
    # and the model agrees: new pixels in a dropped masked patch (seen by neither the
    # encoder nor the loss) leave the loss exactly as it was; in a decoded one they move it.
    for pos, moves in ((dropped, False), (decoded, True)):
        one = torch.zeros(2, VIDEO.num_patches)
        one[0, pos] = 1.0
        cover = unpatchify(one[..., None].expand(-1, -1, VIDEO.patch_dim), VIDEO, VIDEO.grid)
        noise = torch.randn(x.shape, generator=gen(4))  # not a constant: norm-pix would undo that
        assert torch.equal(m(x + noise * cover, gen())[0], loss) != moves


def test_each_decoded_token_is_predicted_at_its_own_position():
    """With no decoder blocks a token's prediction is its own input: the dual decoder must
    then give, at every decoded id, what the full decoder gives there."""
    m = model(decoder_mask_ratio=0.75, decoder_depth=0)
    x = example_input(VIDEO, 2)
    _, pred, seen = m(x, gen())
    _, full, _ = m(x, gen(), decode_all=True)
    torch.testing.assert_close(pred[seen.bool()], full[seen.bool()])
    assert not torch.allclose(pred[seen.bool()], full[seen.bool()].roll(1, 0))  # positions matter


def test_dropped_masked_tokens_do_not_reach_the_decoder():
    """The decoder's input is the visible tokens plus mask tokens at the decoded ids only."""
    m = model(decoder_mask_ratio=0.5)
    x = example_input(VIDEO, 1)
    seen_counts = []

    def count_tokens(_module, args):
        seen_counts.append(args[0].shape[1])

    hook = m.decoder_blocks[0].register_forward_pre_hook(count_tokens)
    m(x, gen())
    m(x, gen(), decode_all=True)
    hook.remove()
    assert seen_counts == [24 + 116, 256]  # 4 x 6 visible + 116 decoded vs all N


@pytest.mark.parametrize("cfg", [VIDEO, IMAGE])
def test_decoder_mask_ratio_zero_is_the_current_loss_exactly(cfg):
    x = example_input(cfg, 2)
    plain = model(cfg)(x, gen())
    off = model(cfg, decoder_mask_ratio=0.0, decoder_masking="random")(x, gen())
    for a, b in zip(plain, off, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a dual-masking model told to decode everything is the plain model too (same weights)
    every = model(cfg, decoder_mask_ratio=0.5)(x, gen(), decode_all=True)
    for a, b in zip(plain, every, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_decoder_masking_on_images_with_a_cls_token_and_gradients():
    m = model(IMAGE, decoder_mask_ratio=0.5, decoder_masking="random").train()
    x = example_input(IMAGE, 3)
    loss, _, seen = m(x, gen())
    assert torch.all(seen.sum(1) == 24)  # 48 masked of 64, half decoded
    loss.backward()
    assert m.mask_token.grad.abs().sum() > 0 and m.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    pictures = m.reconstruct(x, gen())  # pictures decode every masked patch
    assert pictures["reconstruction"].shape == x.shape


@pytest.mark.parametrize("bad", [dict(decoder_mask_ratio=1.0), dict(decoder_mask_ratio=-0.1),
                                 dict(decoder_mask_ratio=0.3), dict(decoder_masking="cells"),
                                 dict(decoder_mask_ratio=0.5, encoder_on_all_tokens=True)])
def test_bad_dual_masking_configs_say_which_field(bad):
    with pytest.raises(UserError, match="mae.decoder_mask"):
        MAEConfig(**bad)
