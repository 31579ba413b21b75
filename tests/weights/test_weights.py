"""Weights in and out: transformers, timm, original MAE / VideoMAE, vitscale.

Every import is checked against an independent reference: the transformers model itself
(random weights, saved with save_pretrained), or for state-dict layouts a forward pass
written here from the published code (timm's VisionTransformer, MAE's and VideoMAE's
position tables). Weights are drawn at unit scale so that a swapped or mis-scaled tensor
moves the outputs far past the tolerance.
"""

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vitscale import weights
from vitscale.cli import main
from vitscale.models.layers import sincos_pos_embed
from vitscale.models.mae import MAE, MAEConfig, masking_of, patchify, random_masking, tube_masking
from vitscale.models.presets import preset
from vitscale.models.vit import ViT

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4  # max abs difference, fp32
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, attn_implementation="eager")
DECODER = dict(decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
               decoder_intermediate_size=64)
VIDEO = dict(SMALL, num_frames=4, tubelet_size=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every trainable weight at unit scale (fan-in scaled), norms around one.

    Fixed tables stored as frozen parameters (ViTMAE's) are left alone.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad or "decoder_pos" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            elif "token" in name or "pos" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def with_mae_tables(hf):
    """Give a transformers ViTMAE the fixed tables its published checkpoints hold (a fresh one in
    transformers 5 has zeros), by transformers' own function and its note on MAE's channel order."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    for table in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
        side = math.isqrt(table.shape[1] - 1)
        pos = build_2d_sinusoidal_position_embedding(side, side, table.shape[-1], cls_token=True)
        half = pos.shape[-1] // 2
        with torch.no_grad():
            table.copy_(torch.cat([pos[..., half:], pos[..., :half]], dim=-1)[None])  # MAE's [w | h] order
    return hf


def zero_key_bias(model: torch.nn.Module) -> torch.nn.Module:
    """VideoMAE layouts have query and value biases only."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.bias"):
                p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
    return model


def saved(model, path):
    model.save_pretrained(path)
    return path


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def masked_rows(pred, mask):
    """[B, N, P] predictions at the masked tokens, in token order -> [B, M, P] (as VideoMAE returns them)."""
    return pred[mask.bool()].reshape(pred.shape[0], -1, pred.shape[-1])


def to_hf_video(x):
    """vitscale [B, C, T, H, W] -> transformers VideoMAE [B, T, C, H, W]."""
    return x.permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------- transformers in
def test_hf_vit_classifier_logits_match(tmp_path):
    hf = scramble(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    model, report = weights.load(saved(hf, tmp_path / "vit"))
    assert model.cfg.norm_eps == 1e-12 and model.cfg.num_classes == 5 and model.cfg.heads == 4
    assert len(report.loaded) == len(model.state_dict()) and not report.left_out and not report.kept_init
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model.eval()(x), hf(pixel_values=x).logits) < TOL
    # pytorch_model.bin with transformers 5's own (in-memory) names: the same model.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "vit" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert any(".q_proj." in k for k in hf.state_dict())
    again, _ = weights.load(tmp_path / "bin")
    assert same_weights(again, model)


def test_hf_vit_model_tokens_match_and_the_pooler_is_never_dropped_silently(tmp_path):
    hf = scramble(transformers.ViTModel(transformers.ViTConfig(**SMALL)))  # with its pooler
    path = saved(hf, tmp_path / "vit")
    with pytest.raises(ValueError, match=r"unexpected: pooler.dense.bias, pooler.dense.weight"):
        weights.load(path)
    model, report = weights.load(path, allow=("pooler.*",))
    assert any(item.startswith("pooler.dense.weight") for item in report.left_out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model.eval().forward_features(x), hf(pixel_values=x).last_hidden_state) < TOL
    _, dropped = weights.load(path, head=False)  # the pooler goes with the class head
    assert any("pooler" in item and "class head dropped" in item for item in dropped.left_out)


def test_hf_vitmae_encoder_decoder_and_loss_match_under_the_same_mask(tmp_path):
    config = transformers.ViTMAEConfig(**SMALL, **DECODER, mask_ratio=0.75, norm_pix_loss=True)
    hf = with_mae_tables(scramble(transformers.ViTMAEForPreTraining(config)))
    source = weights.read(saved(hf, tmp_path / "mae"))
    assert source.mae == MAEConfig(mask_ratio=0.75, masking="random", decoder_width=32, decoder_depth=2,
                                   decoder_heads=4, norm_pix_loss=True)
    assert source.model.pos_embed == "sincos"  # ViTMAE's stored table is MAE's fixed one, checked
    model, _ = weights.build(source)
    assert isinstance(model, MAE)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    masking = random_masking(2, 16, 0.75, noise=noise)  # HF's shuffle of the same noise
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        encoded = hf.vit(pixel_values=x, noise=noise).last_hidden_state
        loss, pred, mask = model.eval()(x, masking=masking)
        assert max_diff(model.encoder.forward_features(x, keep=masking.keep), encoded) < TOL
    assert torch.equal(mask, out.mask)
    assert max_diff(pred, out.logits) < TOL
    assert abs(loss.item() - out.loss.item()) < TOL


def test_hf_videomae_classifier_logits_match(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEO, num_labels=3)
    hf = scramble(transformers.VideoMAEForVideoClassification(config))
    model, report = weights.load(saved(hf, tmp_path / "videomae"))
    cfg = model.cfg
    assert (cfg.frames, cfg.tubelet, cfg.pool, cfg.class_token) == (4, 2, "mean", False)
    assert cfg.pos_embed == "sincos1d"
    assert any("key bias set to zero in 2" in n for n in report.notes)
    assert any("fc_norm" in n and "1e-05" in n for n in report.notes)  # transformers' eps there is 1e-5
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert max_diff(model.eval()(x), hf(pixel_values=to_hf_video(x)).logits) < TOL


def mae_table(dim: int, size: int, cls: bool = False) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed (models_mae.py / util/pos_embed.py), written from its code:
    the grid is meshgrid(w, h), so the half it names emb_h encodes the column."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)))
    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    if cls:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.tensor(table, dtype=torch.float32)


def test_vitscale_fixed_tables_equal_the_published_ones():
    """vitscale's sincos is MAE's released table ([cols | rows]: written here from MAE's code, and
    transformers' rebuilt one); its sincos1d is VideoMAE's get_sinusoid_encoding_table."""
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    torch.testing.assert_close(sincos_pos_embed(16, (1, 4, 4)), mae_table(16, 4))
    hf = with_mae_tables(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**SMALL, **DECODER)))
    torch.testing.assert_close(sincos_pos_embed(64, (1, 4, 4)), hf.vit.embeddings.position_embeddings[0, 1:])
    cfg = preset("pico/4-f4", width=16, heads=2, image_size=12, pos_embed="sincos1d", class_token=False,
                 pool="mean")
    torch.testing.assert_close(ViT(cfg).pos_embed, get_sinusoid_encoding_table(2 * 3 * 3, 16))


def test_hf_videomae_model_tokens_match(tmp_path):
    hf = scramble(transformers.VideoMAEModel(transformers.VideoMAEConfig(**VIDEO, use_mean_pooling=False)))
    model, _ = weights.load(saved(hf, tmp_path / "videomae"))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        tokens = hf(pixel_values=to_hf_video(x)).last_hidden_state
        assert max_diff(model.eval().forward_features(x), tokens) < TOL


def test_hf_videomae_pretraining_matches_with_a_given_mask(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEO, **DECODER, use_mean_pooling=False, norm_pix_loss=False)
    hf = scramble(transformers.VideoMAEForPreTraining(config))
    model, report = weights.load(saved(hf, tmp_path / "videomae"))
    assert model.cfg.decoder_pos_embed == "sincos1d" and model.cfg.masking == "tube"
    assert torch.equal(model.decoder_embed.bias, torch.zeros(32))  # encoder_to_decoder has no bias
    x = torch.randn(2, 3, 4, 32, 32)
    masking = tube_masking(2, model.encoder.cfg.grid, 0.75)
    bool_mask = masking.mask.bool()
    with torch.no_grad():
        out = hf(pixel_values=to_hf_video(x), bool_masked_pos=bool_mask)
        _, pred, mask = model.eval()(x, masking=masking_of(bool_mask))
    assert torch.equal(mask.bool(), bool_mask)
    assert max_diff(masked_rows(pred, bool_mask), out.logits) < TOL
    # transformers' target: the ImageNet-normalised input taken back to [0, 1] pixels.
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None, None]
    target = patchify(x * std + mean, model.encoder.cfg)
    assert abs(model.loss(target, pred, mask).item() - out.loss.item()) < TOL


def test_videomae_without_an_encoder_norm_is_refused(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEO, **DECODER, use_mean_pooling=True)
    hf = transformers.VideoMAEForPreTraining(config)
    with pytest.raises(ValueError, match="use_mean_pooling"):
        weights.read(saved(hf, tmp_path / "videomae"))


# ----------------------------------------------------------------------------- transformers out
def test_export_hf_vit_loads_in_transformers_with_the_same_outputs(tmp_path):
    model = scramble(ViT(preset("pico/4", num_classes=7)))
    _, notes = weights.export(model, tmp_path / "hf", to="hf")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(hf.eval()(pixel_values=x).logits, model(x)) < TOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["layer_norm_eps"] == 1e-6


def test_export_hf_videomae_classifier_and_pretraining_load_in_transformers(tmp_path):
    cfg = preset("pico/4-f4", class_token=False, pool="mean", pos_embed="sincos1d", num_classes=3)
    model = zero_key_bias(scramble(ViT(cfg)))
    weights.export(model, tmp_path / "cls", to="hf")
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "cls").eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert max_diff(hf(pixel_values=to_hf_video(x)).logits, model(x)) < TOL

    mae_cfg = MAEConfig(0.75, "tube", 32, 1, 4, decoder_pos_embed="sincos1d")
    mae = zero_key_bias(scramble(MAE(cfg.replace(num_classes=0), mae_cfg)))
    with torch.no_grad():
        mae.decoder_embed.bias.zero_()  # nor has its encoder_to_decoder a bias
    weights.export(mae, tmp_path / "pre", to="hf")
    hf = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "pre").eval()
    masking = tube_masking(2, cfg.grid, 0.75)
    with torch.no_grad():
        out = hf(pixel_values=to_hf_video(x), bool_masked_pos=masking.mask.bool())
        pred = mae.eval()(x, masking=masking)[1]
    assert max_diff(masked_rows(pred, masking.mask), out.logits) < TOL


def test_export_hf_refuses_what_transformers_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="mean-pools"):
        weights.export(ViT(preset("pico/4", pool="mean")), tmp_path / "a", to="hf")
    with pytest.raises(ValueError, match="sinusoid table"):
        weights.export(ViT(preset("pico/4-f4", class_token=False, pool="mean")), tmp_path / "b", to="hf")
    video = ViT(preset("pico/4-f4", class_token=False, pool="mean", pos_embed="sincos1d"))
    with pytest.raises(ValueError, match="key bias is not zero"):  # q_bias / v_bias only
        weights.export(scramble(video), tmp_path / "c", to="hf")


# ----------------------------------------------------------------------------- timm and the originals
def timm_state(width=64, depth=2, classes=5, grid=4, patch=8, fc_norm=False, seed=0) -> dict:
    """A timm VisionTransformer state dict, by its published names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    D, H = width, 4 * width
    sd = {"cls_token": r(1, 1, D, scale=0.5), "pos_embed": r(1, 1 + grid * grid, D, scale=0.5),
          "patch_embed.proj.weight": r(D, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          "patch_embed.proj.bias": r(D, scale=0.2)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(D, scale=0.2), b + "norm1.bias": r(D, scale=0.2),
               b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D, scale=0.2),
               b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D, scale=0.2),
               b + "norm2.weight": 1 + r(D, scale=0.2), b + "norm2.bias": r(D, scale=0.2),
               b + "mlp.fc1.weight": r(H, D), b + "mlp.fc1.bias": r(H, scale=0.2),
               b + "mlp.fc2.weight": r(D, H), b + "mlp.fc2.bias": r(D, scale=0.2)}
    norm = "fc_norm" if fc_norm else "norm"
    sd |= {f"{norm}.weight": 1 + r(D, scale=0.2), f"{norm}.bias": r(D, scale=0.2),
           "head.weight": r(classes, D), "head.bias": r(classes, scale=0.2)}
    return sd


def timm_forward(sd: dict, x: torch.Tensor, heads: int, pos=None) -> torch.Tensor:
    """timm's VisionTransformer forward (VideoMAE's for a 5D input), written from their code."""
    w = sd["patch_embed.proj.weight"]
    D = w.shape[0]
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    t = conv(x, w, sd["patch_embed.proj.bias"], stride=w.shape[2:]).flatten(2).transpose(1, 2)
    if "cls_token" in sd:
        t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + (sd["pos_embed"] if pos is None else pos)
    B, L, _ = t.shape
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        b = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (D,), b["norm1.weight"], b["norm1.bias"], 1e-6)
        bias = b.get("attn.qkv.bias")
        if "attn.q_bias" in b:  # VideoMAE: qkv_bias = cat(q_bias, zeros, v_bias)
            bias = torch.cat([b["attn.q_bias"], torch.zeros_like(b["attn.v_bias"]), b["attn.v_bias"]])
        qkv = F.linear(h, b["attn.qkv.weight"], bias).reshape(B, L, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, hd]
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, L, D), b["attn.proj.weight"], b["attn.proj.bias"])
        h = F.layer_norm(t, (D,), b["norm2.weight"], b["norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, b["mlp.fc1.weight"], b["mlp.fc1.bias"]))
        t = t + F.linear(h, b["mlp.fc2.weight"], b["mlp.fc2.bias"])
    if "fc_norm.weight" in sd:  # global average pool, then fc_norm
        pooled = t[:, int("cls_token" in sd):].mean(1)
        f = F.layer_norm(pooled, (D,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
    else:
        f = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 0]
    return F.linear(f, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("fc_norm", [False, True])
def test_timm_import_matches_timm_forward_and_round_trips_exactly(tmp_path, fc_norm):
    sd = timm_state(fc_norm=fc_norm)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)  # wrapped, DDP prefix
    model, report = weights.load(path, heads=4)
    assert report.format == "timm" and model.cfg.pool == ("mean" if fc_norm else "cls")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model.eval()(x), timm_forward(sd, x, heads=4)) < TOL
    out, _ = weights.export(model, tmp_path / "timm.safetensors", to="timm")
    exported = load_file(str(out[0]))
    assert exported.keys() == sd.keys() and all(torch.equal(exported[k], sd[k]) for k in sd)
    again, _ = weights.load(out[0], heads=4)
    assert same_weights(again, model)


def test_heads_come_from_the_standard_width_and_are_reported(tmp_path):
    save_file(timm_state(width=192, depth=1), str(tmp_path / "ti.safetensors"))
    source = weights.read(tmp_path / "ti.safetensors")
    assert source.model.heads == 3 and "heads" in source.inferred
    assert any("heads = 3" in n for n in source.notes)
    save_file(timm_state(width=40, depth=1), str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="heads"):
        weights.read(tmp_path / "odd.safetensors")


def mae_state(width=64, depth=2, decoder=32, decoder_depth=2, grid=4, patch=8, seed=1) -> dict:
    """facebookresearch/mae MaskedAutoencoderViT's state dict: timm's encoder, then the decoder."""
    sd = timm_state(width, depth, 1, grid, patch, seed=seed)
    sd = {k: v for k, v in sd.items() if not k.startswith("head")}
    sd["pos_embed"] = mae_table(width, grid, cls=True)[None]  # fixed, stored
    dec = timm_state(decoder, decoder_depth, 3 * patch * patch, grid, patch, seed=seed + 1)
    sd |= {f"decoder_{k}": v for k, v in dec.items() if k.startswith("blocks.")}
    sd |= {"mask_token": 0.5 * torch.randn(1, 1, decoder),
           "decoder_embed.weight": torch.randn(decoder, width) / 8,
           "decoder_embed.bias": 0.2 * torch.randn(decoder), "decoder_norm.weight": dec["norm.weight"],
           "decoder_norm.bias": dec["norm.bias"], "decoder_pred.weight": dec["head.weight"],
           "decoder_pred.bias": dec["head.bias"],
           "decoder_pos_embed": mae_table(decoder, grid, cls=True)[None]}
    return sd


def test_mae_original_round_trips_and_agrees_with_transformers(tmp_path):
    sd = mae_state()
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    source = weights.read(tmp_path / "mae_pretrain.pth", heads=4, decoder_heads=4)
    assert source.format == "mae" and source.model.pos_embed == "sincos"  # MAE's tables, recognised
    assert source.mae.decoder_pos_embed == "sincos"
    model, _ = weights.build(source)
    out, _ = weights.export(model, tmp_path / "mae.safetensors", to="timm")
    exported = load_file(str(out[0]))
    assert exported.keys() == sd.keys()
    assert all(torch.allclose(exported[k], sd[k], atol=1e-6, rtol=0) for k in sd)  # tables: float32 rounding
    again, _ = weights.load(out[0], heads=4, decoder_heads=4)
    x, masking = torch.randn(2, 3, 32, 32), random_masking(2, 16, 0.75)
    with torch.no_grad():
        pred = model.eval()(x, masking=masking)[1]
        assert torch.equal(again.eval()(x, masking=masking)[1], pred)
    # The same weights through transformers' ViTMAE: an independent decoder to agree with.
    weights.export(model, tmp_path / "hf", to="hf")
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    noise = masking.restore.float()  # argsort(restore) is the same shuffle
    with torch.no_grad():
        assert max_diff(hf.eval()(pixel_values=x, noise=noise).logits, pred) < TOL
    # --init: the encoder into a fine-tuning model, the decoder left out and said so.
    classifier = ViT(preset("pico/4", depth=2, heads=4, patch_size=8, num_classes=10))
    report = weights.init_encoder(classifier, tmp_path / "mae_pretrain.pth")
    assert torch.equal(classifier.pos_embed, sd["pos_embed"])  # MAE fine-tunes its fixed table as learned
    assert any(k.startswith("decoder_pred.weight (pre-training decoder") for k in report.left_out)
    assert any(k.startswith("head.weight (new class head") for k in report.kept_init)


def videomae_state(width=64, depth=2, decoder=32, decoder_depth=1, tubelet=2, patch=8, classes=0, seed=2):
    """MCG-NJU/VideoMAE state dicts: q_bias / v_bias, a Conv3d tubelet, no position table stored.
    classes=0: the pre-training model (encoder. / decoder.); else the fine-tuned one (fc_norm, head)."""
    def video(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("attn.qkv.bias"):
                q, _, val = v.chunk(3)
                out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, val
            elif k == "patch_embed.proj.weight":  # [D, C, p, p] -> [D, C, tubelet, p, p]
                out[k] = torch.stack([v / tubelet] * tubelet, dim=2) * (1 + 0.1 * torch.randn(tubelet, 1, 1))
            elif k not in ("cls_token", "pos_embed"):
                out[k] = v
        return out

    encoder = video(timm_state(width, depth, max(classes, 1), 4, patch, fc_norm=bool(classes), seed=seed))
    if classes:
        return encoder
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head")}
    dec = video(timm_state(decoder, decoder_depth, 3 * tubelet * patch * patch, 4, patch, seed=seed + 1))
    sd = {f"encoder.{k}": v for k, v in encoder.items()}
    sd |= {f"decoder.{k}": v for k, v in dec.items() if k.startswith(("blocks.", "norm.", "head."))}
    sd |= {"encoder_to_decoder.weight": torch.randn(decoder, width) / 8,
           "mask_token": 0.5 * torch.randn(1, 1, decoder)}
    return sd


def test_videomae_finetuned_matches_its_forward_and_round_trips(tmp_path):
    sd = videomae_state(classes=3)
    torch.save({"module": sd}, tmp_path / "videomae_ft.pth")
    model, report = weights.load(tmp_path / "videomae_ft.pth", heads=4, image_size=32, frames=4)
    assert report.format == "videomae" and model.cfg.pos_embed == "sincos1d" and model.cfg.pool == "mean"
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert max_diff(model.eval()(x), timm_forward(sd, x, heads=4, pos=model.pos_embed)) < TOL
        # ... and the table is VideoMAE's (test_vitscale_fixed_tables_equal_the_published_ones)
    out, _ = weights.export(model, tmp_path / "timm.safetensors", to="timm")
    again, _ = weights.load(out[0], heads=4, frames=4)
    assert same_weights(again, model)


def test_videomae_pretrained_round_trips_and_agrees_with_transformers(tmp_path):
    sd = videomae_state()
    torch.save({"model": sd}, tmp_path / "videomae_pretrain.pth")
    like = preset("pico/4-f4", width=64, depth=2, heads=4, patch_size=8, class_token=False, pool="mean")
    source = weights.read(tmp_path / "videomae_pretrain.pth", like=like, decoder_heads=4)
    assert source.format == "videomae" and source.model.grid == (2, 4, 4)
    assert source.mae.decoder_pos_embed == "sincos1d" and source.mae.decoder_depth == 1
    assert any("key bias set to zero" in n for n in source.notes)
    model, _ = weights.build(source)
    weights.export(model, tmp_path / "vs", to="vitscale")
    again, _ = weights.load(tmp_path / "vs")
    assert same_weights(again, model)
    weights.export(model, tmp_path / "hf", to="hf")
    hf = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    x, masking = torch.randn(2, 3, 4, 32, 32), tube_masking(2, (2, 4, 4), 0.75)
    with torch.no_grad():
        pred = again.eval()(x, masking=masking)[1]
        logits = hf(pixel_values=to_hf_video(x), bool_masked_pos=masking.mask.bool()).logits
    assert max_diff(masked_rows(pred, masking.mask), logits) < TOL


# ----------------------------------------------------------------------------- resampling, heads, errors
def test_position_tables_follow_the_requested_size(tmp_path):
    hf = scramble(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    path = saved(hf, tmp_path / "vit")
    model, report = weights.load(path, image_size=48, num_classes=10)
    assert model.pos_embed.shape == (1, 1 + 36, 64) and any("resampled" in r for r in report.resampled)
    source = weights.read(path)
    plane = source.state["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)  # [1, D, 4, 4]
    expected = F.interpolate(plane, size=(6, 6), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 64)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)
    assert any(k.startswith("head.weight") and "class head dropped" in k for k in report.left_out)
    assert any(k.startswith("head.weight") and "new class head" in k for k in report.kept_init)
    hf_video = transformers.VideoMAEModel(transformers.VideoMAEConfig(**VIDEO, use_mean_pooling=False))
    video, report = weights.load(saved(hf_video, tmp_path / "video"), frames=8)  # fixed table: recomputed
    assert video.cfg.grid == (4, 4, 4) and video.cfg.pos_embed == "sincos1d"


def test_missing_unexpected_and_misshapen_keys_are_listed_unless_allowed(tmp_path):
    sd = timm_state()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["dist_token"] = torch.zeros(1, 1, 64)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as error:
        weights.load(tmp_path / "bad.safetensors", heads=4)
    message = str(error.value)
    assert "missing: blocks.1.mlp.2.bias" in message and "unexpected: dist_token" in message
    assert "\n" not in message
    allow = ("blocks.1.mlp.2.bias", "dist_token")
    model, report = weights.load(tmp_path / "bad.safetensors", heads=4, allow=allow)
    assert any(k.startswith("blocks.1.mlp.2.bias") for k in report.kept_init)
    assert any(k.startswith("dist_token") for k in report.left_out)
    target = ViT(preset("pico/4", width=64, depth=2, heads=4, patch_size=8, num_classes=10))
    source = weights.read(tmp_path / "bad.safetensors", heads=4)
    with pytest.raises(ValueError, match=r"wrong shape: .*head.weight \(5, 64\) vs \(10, 64\)"):
        weights.load_into(target, source, allow=("blocks.1.mlp.2.bias", "dist_token"))
    report = weights.load_into(target, source, allow=("blocks.1.mlp.2.bias", "dist_token", "head.*"))
    assert any(k.startswith("head.weight") and "other shape" in k for k in report.kept_init)


def test_heads_mismatch_and_a_fixed_table_mismatch_are_errors(tmp_path):
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL))
    source = weights.read(saved(hf, tmp_path / "vit"))
    with pytest.raises(ValueError, match="4 heads, this model 2"):
        weights.load_into(ViT(preset("pico/4", depth=2, patch_size=8, heads=2, num_classes=2)), source)
    fixed = ViT(preset("pico/4", depth=2, patch_size=8, heads=4, pos_embed="sincos", num_classes=2))
    with pytest.raises(ValueError, match="pos_embed=learned"):  # a learned table cannot go into a fixed one
        weights.load_into(fixed, source, head=False)


class Payload:
    """A pickled object whose unpickling would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pickled_object_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": timm_state(depth=1), "payload": Payload(marker)}, path)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload works when unpickled ...
    assert probe.exists()
    with pytest.raises(ValueError, match="runs no code") as error:
        weights.read(path, heads=4)
    assert not marker.exists()  # ... and vitscale never ran it
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- command line
def test_cli_convert_chain_ends_where_it_started(tmp_path, capsys):
    hf = scramble(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    src = saved(hf, tmp_path / "hf")
    assert main(["convert", str(src), "--to", "timm", str(tmp_path / "t.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "t.safetensors"), "--to", "vitscale", str(tmp_path / "v"),
                 "--heads", "4"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "v"), "--to", "hf", str(tmp_path / "back"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "vitscale" and len(result["loaded"]) == 2 + 2 + 2 * 12 + 2 + 2
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(back.eval()(pixel_values=x).logits, hf(pixel_values=x).logits) < TOL
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitscale: error:") and err.count("\n") == 1


def test_cli_finetune_starts_from_a_transformers_directory(tmp_path, capsys):
    shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256)  # pico/4
    config = transformers.ViTConfig(**shape, image_size=32, patch_size=4, num_labels=5)
    hf = scramble(transformers.ViTForImageClassification(config))
    src = saved(hf, tmp_path / "hf")
    out = tmp_path / "ft"
    argv = ["finetune", "--init", str(src), "--out", str(out), "--train.max_steps=2", "--train.batch=32",
            "--train.threads=1", "--data.image_size=16", "--model.patch_size=4", "--train.warmup_epochs=0",
            "--train.base_lr=0", "--train.min_lr=0", "--model.norm_eps=1e-12", "--train.knn_k=0"]
    assert main(argv) == 0
    logged = capsys.readouterr()
    assert "resampled" in logged.out + logged.err and "hf-vit" in logged.out + logged.err
    ckpt = sorted(out.glob("ckpt-*"))[-1] / "model.safetensors"
    state = load_file(str(ckpt))
    layer = "vit.encoder.layer.0.attention.attention."
    hf_state = load_file(str(src / "model.safetensors"))
    qkv = torch.cat([hf_state[f"{layer}{n}.weight"] for n in ("query", "key", "value")])
    assert torch.equal(state["vit.blocks.0.attn.qkv.weight"], qkv)  # lr 0: the weights are the imported ones
