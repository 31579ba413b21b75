"""MAE / VideoMAE pre-training done as the official code does it (issue 11, "faithful details").

References, each checked against its definition or against transformers' own model:
  - MAE's and VideoMAE's _init_weights: xavier_uniform on every Linear (bound
    sqrt(6 / (fan_in + fan_out))), zero biases, unit norms; supervised ViT stays N(0, 0.02).
  - The pretrain recipe: a fixed sin-cos encoder table; norm-pix loss on real data.
  - VideoMAE's norm-pix target per channel, against VideoMAEForPreTraining's loss.
"""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from vitscale import weights
from vitscale.cli import main
from vitscale.common import records
from vitscale.data import DataInfo
from vitscale.models.layers import fixed_pos_embed
from vitscale.models.mae import MAE, MAEConfig, masking_of, normalize_channels, patchify, tube_masking
from vitscale.models.presets import preset
from vitscale.models.vit import INIT_STD, ViT
from vitscale.train import config, inputs

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None, None]  # transformers' constants
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None, None]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def xavier_bound(weight: torch.Tensor) -> float:
    """torch.nn.init.xavier_uniform_'s bound for a [fan_out, fan_in] matrix (Glorot & Bengio 2010)."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def assert_uniform(weight: torch.Tensor, bound: float, name: str) -> None:
    """Drawn from U(-bound, bound): inside it, reaching near it, std bound / sqrt(3) within 5%."""
    w = weight.detach().flatten()
    assert w.abs().max() <= bound, name
    assert w.abs().max() > 0.9 * bound, name
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name


def encoder_linears(vit: ViT) -> dict[str, nn.Linear]:
    return {n: m for n, m in vit.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- 1. init
def test_mae_encoder_draws_every_linear_xavier_uniform_as_mae():
    mae = MAE(preset("pico/4"), MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2))
    enc = mae.encoder
    linears = encoder_linears(enc)
    assert len(linears) == 4 * enc.cfg.depth  # qkv, proj, fc1, fc2 per block; no head
    for name, m in linears.items():
        assert_uniform(m.weight, xavier_bound(m.weight), name)
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    for name, m in enc.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), name
    w = enc.patch_embed.proj.weight  # MAE: xavier on the [D, C*p*p] view
    assert_uniform(w, xavier_bound(w.view(w.shape[0], -1)), "patch_embed")
    assert abs(enc.cls_token.std().item() / INIT_STD - 1) < 0.3  # 64 draws of N(0, 0.02)


def test_supervised_vit_keeps_truncated_normal_002():
    vit = ViT(preset("pico/4"))
    for name, m in encoder_linears(vit).items():
        w = m.weight.detach()
        assert abs(w.std().item() / INIT_STD - 1) < 0.05, name  # cut at +-2 (absolute): N(0, 0.02) whole
        assert w.std() < 0.5 * xavier_bound(w) / math.sqrt(3), name  # not xavier's (4x wider here)


def test_xavier_under_mup_scales_hidden_matrices_as_mup_does():
    """Both fans grow with width, so xavier's std shrinks as 1/sqrt(width_mult): muP's hidden rule."""
    mae_cfg = MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2)
    base = MAE(preset("pico/4", param="mup"), mae_cfg).encoder
    wide_cfg = preset("pico/4", width=256, heads=8, param="mup", base_width=64, base_head_dim=32)
    wide = MAE(wide_cfg, mae_cfg).encoder
    ratio_mup = wide.cfg.hidden_std / base.cfg.hidden_std  # 1 / sqrt(4)
    for name in base.hidden_matrices():
        ratio = wide.hidden_matrices()[name].std().item() / base.hidden_matrices()[name].std().item()
        assert abs(ratio / ratio_mup - 1) < 0.05, name
    w = wide.patch_embed.proj.weight  # input weights keep the base's std (embed_gain)
    assert abs(w.std().item() / base.patch_embed.proj.weight.std().item() - 1) < 0.05


# ----------------------------------------------------------------------------- 2. recipe
def test_pretrain_recipe_has_a_fixed_sincos_encoder_table_that_a_preset_keeps():
    cfg = config.with_preset(config.recipe("pretrain"), "mu/4")
    assert cfg.model.pos_embed == "sincos" and cfg.model.width == 144
    assert config.with_preset(config.recipe("train"), "mu/4").model.pos_embed == "learned"  # DeiT's
    assert config.recipe("finetune", init="x").model.pos_embed == "learned"
    mae = MAE(cfg.model, cfg.mae)
    assert "encoder.pos_embed" not in dict(mae.named_parameters())  # a buffer, not learned


# ----------------------------------------------------------------------------- 3. norm-pix default
def info(name: str) -> DataInfo:
    return DataInfo(name, 10, tuple("0123456789"), 3, 1, 32, (0.5,) * 3, (0.5,) * 3)


def pretrain(*overrides: str):
    return records.apply_overrides(config.recipe("pretrain"), list(overrides))


@pytest.mark.parametrize("data, expected", [
    (["data.name=digits"], False),
    (["data.name=cluttered-digits"], False),
    (["data.name=image-folder", "data.path=/nowhere"], True),
    (["data.name=video-csv", "data.path=/nowhere.csv", "data.num_classes=3", "data.frames=4"], True),
])
def test_norm_pix_loss_auto_is_on_for_real_data_off_for_builtin(data, expected):
    cfg = pretrain(*data)
    assert cfg.mae.norm_pix_loss == "auto"
    assert inputs.resolve(cfg, info(cfg.data.name)).mae.norm_pix_loss is expected


@pytest.mark.parametrize("data", [["data.name=digits"], ["data.name=image-folder", "data.path=/nowhere"]])
@pytest.mark.parametrize("explicit", [True, False])
def test_an_explicit_norm_pix_loss_wins_over_the_data_default(data, explicit):
    cfg = pretrain(*data, f"mae.norm_pix_loss={str(explicit).lower()}")
    resolved = inputs.resolve(cfg, info(cfg.data.name))
    assert resolved.mae.norm_pix_loss is explicit
    assert inputs.resolve(resolved, info(cfg.data.name)) == resolved  # resolving twice changes nothing


def test_norm_pix_settings_are_checked():
    with pytest.raises(ValueError, match="mae.norm_pix_loss"):
        pretrain("mae.norm_pix_loss=sometimes")
    with pytest.raises(ValueError, match="mae.norm_pix_by"):
        pretrain("mae.norm_pix_by=pixel")


# ----------------------------------------------------------------------------- 4. per-channel target
def test_channel_normalisation_is_per_channel_of_each_patch_and_undoes():
    patches = torch.randn(2, 5, 4 * 3) * 3 + 1  # (pixels, C) rows: 4 pixels x 3 channels
    normed, mean, std = normalize_channels(patches, 3)
    for c in range(3):  # the definition, one channel at a time
        x = patches[..., c::3]
        expected = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(normed[..., c::3], expected)
    torch.testing.assert_close(normed * std + mean, patches)


@pytest.fixture
def hf_videomae(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config_ = transformers.VideoMAEConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_frames=4, tubelet_size=2, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, use_mean_pooling=False,
        norm_pix_loss=True, attn_implementation="eager")
    hf = transformers.VideoMAEForPreTraining(config_).eval()
    with torch.no_grad():  # random init leaves the decoder head at zero: give it a real prediction
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "videomae")
    return hf, tmp_path / "videomae"


def test_channel_norm_pix_reproduces_transformers_videomae_loss(hf_videomae):
    hf, path = hf_videomae
    model, _ = weights.load(path)
    assert model.cfg.norm_pix_by == "channel" and model.cfg.norm_pix_loss is True  # read from config.json
    x = torch.randn(2, 3, 4, 32, 32)  # ImageNet-normalised frames, [B, C, T, H, W]
    masking = tube_masking(2, model.encoder.cfg.grid, 0.75)
    bool_mask = masking.mask.bool()
    with torch.no_grad():
        out = hf(pixel_values=x.transpose(1, 2), bool_masked_pos=bool_mask)  # HF: [B, T, C, H, W]
        loss, pred, mask = model.eval()(x, masking=masking_of(bool_mask))
        # transformers builds the target from the frames taken back to [0, 1] pixels: given those, exact
        pixels = patchify(x * IMAGENET_STD + IMAGENET_MEAN, model.encoder.cfg)
        exact = model.loss(pixels, pred, mask)
        by_patch = MAE(model.encoder.cfg, replace(model.cfg, norm_pix_by="patch"))
        patch_loss = by_patch.loss(pixels, pred, mask)
    assert abs(exact.item() - out.loss.item()) < 1e-5 * out.loss.item()
    # vitscale's own loss, on the normalised input as given: per channel that differs by eps / std only
    assert abs(loss.item() - out.loss.item()) < 1e-4 * out.loss.item()
    assert abs(patch_loss.item() - out.loss.item()) > 1e-3 * out.loss.item()  # MAE's form: another loss


def test_reconstruction_undoes_the_channel_target(monkeypatch):
    model = MAE(preset("pico/4-f4", class_token=False, pool="mean"),
                MAEConfig(0.75, "tube", 32, 1, 4, norm_pix_by="channel")).eval()
    x = torch.randn(2, 3, 4, 32, 32) * 2 + 0.5
    target = patchify(x, model.encoder.cfg)
    perfect = normalize_channels(target, 3)[0]  # a decoder that predicts the target exactly
    monkeypatch.setattr(model, "decode", lambda tokens, grid: perfect)
    torch.testing.assert_close(model.reconstruct(x)["reconstruction"], x, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- fine-tuning from the recipe
@pytest.mark.slow
def test_finetuning_starts_a_learned_table_from_a_sincos_pretraining_run(tmp_path):
    """MAE's main_finetune: the pre-trained fixed table is loaded into a learned pos_embed."""
    run = tmp_path / "pre"
    main(["pretrain", "--out", str(run), "--train.max_steps=1", "--train.knn_k=0"])
    saved = config.load_yaml(run / "config.yaml")
    assert saved.model.pos_embed == "sincos" and saved.mae.norm_pix_loss is False  # digits: raw pixels
    ft = ViT(config.recipe("finetune", init=str(run)).model.replace(image_size=32, num_classes=10))
    assert ft.cfg.pos_embed == "learned"
    weights.init_encoder(ft, run)
    expected = fixed_pos_embed("sincos", ft.cfg.width, ft.cfg.grid)
    torch.testing.assert_close(ft.pos_embed[0, 1:].detach(), expected)
    assert ft.pos_embed.requires_grad
