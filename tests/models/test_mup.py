"""muP and depth-muP: exactly SP at the base shape, flat coordinates across widths, the
prescribed optimizer multipliers, and weights that fold into an SP model that computes the same."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitscale import weights
from vitscale.common.records import apply_overrides
from vitscale.common.stats import loglog_slope
from vitscale.cost.complexity import cost
from vitscale.cost.scaling import scale
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.presets import preset
from vitscale.models.vit import ViT, ViTConfig
from vitscale.tasks import Classifier, Pretrainer
from vitscale.train import engine, optim
from vitscale.train.config import RunConfig

SMALL = dict(image_size=8, patch_size=4, in_chans=3, num_classes=10)


def batch(n: int = 16, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def adamw_steps(model: torch.nn.Module, steps: int, lr: float, wd: float = 0.0) -> list[float]:
    """`steps` AdamW steps through vitscale's groups and set_lr; returns the losses."""
    x, y = batch()
    opt = torch.optim.AdamW(optim.param_groups(model, wd), lr=0.0)
    optim.set_lr(opt, lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- ratio 1 is SP
@pytest.mark.parametrize("base", [{}, dict(base_width=64, base_depth=2, base_head_dim=32)])
def test_mup_at_the_base_shape_is_sp_exactly(base):
    sp_cfg = ViTConfig(width=64, depth=2, heads=2, **SMALL)
    mup_cfg = sp_cfg.replace(param="mup", **base)
    assert (mup_cfg.width_mult, mup_cfg.depth_mult, mup_cfg.branch_mult, mup_cfg.readout_mult) == (1, 1, 1, 1)
    torch.manual_seed(0)
    sp = ViT(sp_cfg)
    torch.manual_seed(0)
    mup = ViT(mup_cfg)
    for (k, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    def groups(model):
        return [(len(g["params"]), g["lr_scale"], g["weight_decay"]) for g in optim.param_groups(model, 0.05)]

    assert groups(sp) == groups(mup)
    assert adamw_steps(sp, 3, 1e-2, wd=0.05) == adamw_steps(mup, 3, 1e-2, wd=0.05)  # bit for bit
    for (k, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x, _ = batch()
    assert torch.equal(sp(x), mup(x))


def test_base_fields_do_nothing_under_sp():
    cfg = ViTConfig(width=128, depth=4, heads=2, **SMALL)
    with_base = cfg.replace(base_width=64, base_depth=2, base_head_dim=32)
    assert (with_base.width_mult, with_base.depth_mult, with_base.attn_scale) == (1.0, 1.0, None)
    torch.manual_seed(0)
    model = ViT(with_base)
    assert optim.lr_multipliers(model) == {} and model.blocks[0].attn.scale is None
    assert model.blocks[0].branch_mult == 1.0


# ----------------------------------------------------------------------------- coordinate check
def coordinates(param: str, width: int, steps: int = 4, lr: float = 1e-2) -> dict[str, float]:
    """Mean |activation| of each block's output and of the logits after `steps` AdamW steps.

    Two heads at every width, so the head dim grows with width too (muP's 1/d logits).
    """
    torch.manual_seed(0)
    cfg = ViTConfig(width=width, depth=2, heads=2, param=param, base_width=64, base_depth=2,
                    base_head_dim=32, **SMALL)
    model = ViT(cfg)
    adamw_steps(model, steps, lr)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: outputs.append(out.abs().mean().item()))
    with torch.no_grad():
        logits = model(batch()[0]).abs().mean().item()
    return {f"block{i}": v for i, v in enumerate(outputs)} | {"logits": logits}


@pytest.mark.parametrize("param", ["sp", "mup"])
def test_coordinate_check(param):
    """After a few AdamW steps at one LR, activations stay put across widths 64 -> 512 under
    muP and grow under SP (Tensor Programs V, Fig. 5). Measured slopes (log act / log width,
    three seeds): muP blocks -0.03..0.00, logits -0.21..-0.04; SP blocks 1.41..1.67, logits 0.48..0.69."""
    widths = [64, 128, 256, 512]
    rows = [coordinates(param, w) for w in widths]
    slopes = {k: loglog_slope(widths, [r[k] for r in rows]) for k in rows[0]}
    if param == "mup":
        assert all(abs(s) < 0.35 for s in slopes.values()), slopes
        for k in rows[0]:
            values = [r[k] for r in rows]
            assert max(values) / min(values) < 2, (k, values)
    else:
        assert slopes["block0"] > 1.0 and slopes["block1"] > 1.0 and slopes["logits"] > 0.3, slopes


# ----------------------------------------------------------------------------- the multipliers
def test_optimizer_groups_and_init_follow_mup():
    cfg = ViTConfig(width=256, depth=8, heads=4, param="mup", base_width=64, base_depth=2, base_head_dim=32,
                    **SMALL)
    assert (cfg.width_mult, cfg.depth_mult, cfg.head_dim) == (4.0, 4.0, 64)
    assert cfg.attn_scale == pytest.approx(math.sqrt(32) / 64)  # sqrt(base hd) / hd: 1/d
    assert cfg.branch_mult == 0.5 and cfg.readout_mult == 0.25
    model = Classifier(cfg)
    hidden = 1 / 4  # 1/width_mult; depth moves the branches, not the LR (vit.DEPTH_LR_EXPONENT = 0)
    mults = optim.lr_multipliers(model)
    assert set(mults) == {f"vit.blocks.{i}.{m}.weight" for i in range(8)
                          for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    assert set(mults.values()) == {hidden}
    by_param = {id(p): g for g in optim.param_groups(model, 0.05) for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        if name in mults:
            assert (g["lr_scale"], g["weight_decay"]) == (hidden, pytest.approx(0.05 / hidden))
        else:  # input-like weights, biases, norms, the head
            assert g["lr_scale"] == 1.0, name
    vit = model.vit
    assert vit.blocks[0].attn.scale == cfg.attn_scale and vit.blocks[3].branch_mult == 0.5
    fc2 = torch.cat([b.mlp[2].weight.flatten() for b in vit.blocks])
    assert fc2.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 0.02 / sqrt(width_mult)
    assert vit.head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the readout keeps SP's init
    # the patch embedding keeps the base's xavier std, not one that shrinks with width
    base_std = math.sqrt(2 / (cfg.patch_dim + 64))
    assert vit.patch_embed.proj.weight.std().item() == pytest.approx(base_std, rel=0.05)


def test_mae_applies_mup_to_its_encoder_only():
    cfg = ViTConfig(width=128, depth=2, heads=2, param="mup", base_width=64, **SMALL)
    module = Pretrainer(cfg, MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2))
    mults = optim.lr_multipliers(module)
    assert mults and all(k.startswith("mae.encoder.blocks.") for k in mults)
    assert set(mults.values()) == {0.5}


# ----------------------------------------------------------------------------- config
def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="param must be 'sp' or 'mup'"):
        ViTConfig(param="mu")
    with pytest.raises(ValueError, match="base_width, base_depth and base_head_dim must be >= 0"):
        ViTConfig(base_width=-1)
    run = apply_overrides(RunConfig(), ["model.param=mup", "model.base_width=32", "model.base_depth=2",
                                        "model.base_head_dim=16"])
    assert (run.model.param, run.model.width_mult, run.model.depth_mult) == ("mup", 2.0, 2.0)
    with pytest.raises(ValueError, match="model.base_width must be int"):
        apply_overrides(RunConfig(), ["model.base_width=wide"])


def test_scaling_keeps_the_base_and_costs_ignore_the_multipliers():
    base = preset("pico/4")
    mup = base.replace(param="mup", base_width=base.width, base_depth=base.depth, base_head_dim=base.head_dim)
    wide = scale(mup, "w", 4)
    assert (wide.param, wide.base_width, wide.base_depth, wide.base_head_dim) == ("mup", 64, 4, 32)
    assert wide.width_mult == wide.width / 64 > 1
    assert scale(mup, "d", 4).depth_mult > 1
    assert cost(wide) == cost(wide.replace(param="sp"))
    assert scale(base, "w", 4) == wide.replace(param="sp", base_width=0, base_depth=0, base_head_dim=0)


# ----------------------------------------------------------------------------- weights
MUP = ViTConfig(width=128, depth=4, heads=2, param="mup", base_width=64, base_depth=2, base_head_dim=32,
                image_size=16, patch_size=4, num_classes=5)


def trained(cfg: ViTConfig) -> ViT:
    """A model whose multipliers matter: weights moved off their init, biases included."""
    torch.manual_seed(0)
    model = ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_fold_gives_an_sp_model_with_the_same_outputs():
    model = trained(MUP)
    sp = weights.standard(model)
    assert sp.cfg.param == "sp" and sp.cfg == MUP.replace(param="sp", base_width=0, base_depth=0,
                                                           base_head_dim=0)
    assert set(sp.state_dict()) == set(model.state_dict())  # the same keys: nothing renamed
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), model(x), atol=1e-5, rtol=0)
        back, cfg = weights.fold_mup(sp.state_dict(), MUP, inverse=True)  # and unfolds again
        again = ViT(cfg)
        again.load_state_dict(back)
        torch.testing.assert_close(again.eval()(x), model(x), atol=1e-5, rtol=0)


def test_export_of_a_mup_model_folds_for_hf_and_timm_and_keeps_mup_for_vitscale(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = trained(MUP)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    _, notes = weights.export(model, tmp_path / "hf", to="hf")
    assert any("muP multipliers folded" in n for n in notes)
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).logits, expected, atol=1e-5, rtol=0)
    weights.export(model, tmp_path / "timm", to="timm")
    timm_model, _ = weights.load(tmp_path / "timm" / "model.safetensors", heads=2)
    weights.export(model, tmp_path / "vs", to="vitscale")
    vs_model, _ = weights.load(tmp_path / "vs")
    assert timm_model.cfg.param == "sp" and vs_model.cfg == MUP
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), expected, atol=1e-5, rtol=0)
        assert torch.equal(vs_model.eval()(x), expected)


def test_mae_export_folds_its_encoder(tmp_path):
    torch.manual_seed(0)
    decoder = MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2)
    mae = MAE(MUP.replace(num_classes=0), decoder).eval()
    sp = weights.standard(mae)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sp.encoder(x), mae.encoder(x), atol=1e-5, rtol=0)
    files, notes = weights.export(mae, tmp_path / "timm", to="timm")
    assert files and any("folded" in n for n in notes)


def test_init_from_a_mup_run_into_sp_and_into_another_base(tmp_path):
    """--init folds: a muP source loads into an SP model (or a muP one of another base) computing the same."""
    cfg = apply_overrides(RunConfig(out=str(tmp_path / "run")), [
        "train.batch=32", "train.max_steps=2", "train.threads=1", "train.knn_k=0", "data.image_size=16",
        "train.warmup_epochs=0", "model.param=mup", "model.base_width=32", "model.base_depth=2",
        "model.base_head_dim=16", "train.base_lr=0.05"])
    engine.train(cfg)
    source = weights.read(tmp_path / "run")
    assert source.model.param == "mup" and source.model.base_width == 32
    mup_model, _ = weights.build(source)
    x = torch.randn(2, 3, 16, 16)
    for target in (source.model.replace(param="sp"), source.model.replace(base_width=16, base_depth=1)):
        model = ViT(target)
        report = weights.load_into(model, source)
        assert any("muP multipliers folded" in n for n in report.notes)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), mup_model.eval()(x), atol=1e-5, rtol=0)
    report, _ = weights.convert(tmp_path / "run", "timm", tmp_path / "timm.safetensors")  # `vitscale convert`
    assert any("muP multipliers folded" in n for n in report.notes)
    timm_model, _ = weights.load(tmp_path / "timm.safetensors", heads=source.model.heads)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), mup_model(x), atol=1e-5, rtol=0)
