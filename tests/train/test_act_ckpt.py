"""train.act_ckpt: every transformer block recomputed in backward (torch.utils.checkpoint,
non-reentrant) gives the loss and gradients of the plain model, bit for bit on CPU, drop-path
included (the checkpoint restores the RNG state for the recomputation).

The first non-reentrant checkpoint in a process imports torch._dynamo (a few seconds once)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vitscale.common.checkpoint import at
from vitscale.common.records import apply_overrides
from vitscale.models.layers import checkpoint_blocks
from vitscale.models.mae import MAE, MAEConfig
from vitscale.models.presets import preset
from vitscale.models.vit import ViT
from vitscale.train import engine
from vitscale.train.config import RunConfig


def loss_and_grads(model, forward, seed=0):
    """The loss of forward(model) and every parameter's gradient, from RNG seed `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = forward(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same_with_and_without(model, forward):
    """(loss, grads) without and with activation checkpointing; checks the checkpointing ran."""
    plain = loss_and_grads(model, forward)
    assert checkpoint_blocks(model) > 0
    recomputed = []  # each block's forward runs twice: once in forward, once in backward
    hooks = [b.attn.register_forward_hook(lambda *a: recomputed.append(1)) for b in model.modules()
             if getattr(b, "act_ckpt", False)]
    ckpt = loss_and_grads(model, forward)
    for h in hooks:
        h.remove()
    assert len(recomputed) == 2 * len(hooks)
    checkpoint_blocks(model, on=False)
    return plain, ckpt


def assert_bitwise(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_a_checkpointed_vit_has_the_plain_loss_and_gradients(drop_path):
    torch.manual_seed(0)
    model = ViT(preset("pico/4", image_size=16, num_classes=5, depth=2, drop_path=drop_path)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    plain, ckpt = same_with_and_without(model, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    assert_bitwise(plain, ckpt)
    if drop_path:  # the draws mattered: another seed drops other branches
        assert not torch.equal(loss_and_grads(model, lambda m: torch.nn.functional.cross_entropy(m(x), y),
                                              seed=1)[0], plain[0])


def test_checkpointing_that_forgot_the_rng_would_differ():
    """The reference the drop-path case needs: recomputing without restoring the RNG state
    draws other masks, so the gradients differ (what preserve_rng_state guards against)."""
    torch.manual_seed(0)
    model = ViT(preset("pico/4", image_size=16, num_classes=5, depth=2, drop_path=0.3)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    plain = loss_and_grads(model, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    blocks = list(model.blocks)
    originals = [b.forward for b in blocks]
    for b in blocks:
        b.forward = (lambda blk: lambda t: torch.utils.checkpoint.checkpoint(
            blk._forward, t, False, use_reentrant=False, preserve_rng_state=False))(b)
    forgot = loss_and_grads(model, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    for b, f in zip(blocks, originals, strict=True):
        b.forward = f
    assert torch.equal(plain[0], forgot[0])  # the forward is the same
    assert not all(torch.equal(plain[1][k], forgot[1][k]) for k in plain[1])


def test_a_checkpointed_mae_encoder_and_decoder_have_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    enc = preset("pico/4", image_size=16, depth=2, drop_path=0.2)
    model = MAE(enc, MAEConfig(decoder_width=32, decoder_depth=2, decoder_heads=2)).train()
    assert checkpoint_blocks(model) == enc.depth + 2 and checkpoint_blocks(model, on=False)
    x = torch.randn(4, 3, 16, 16)

    def forward(m):
        return m(x, generator=torch.Generator().manual_seed(3))[0]

    plain, ckpt = same_with_and_without(model, forward)
    assert_bitwise(plain, ckpt)


def test_no_recomputation_without_gradients():
    torch.manual_seed(0)
    model = ViT(preset("pico/4", image_size=16, num_classes=5, depth=2))
    checkpoint_blocks(model)
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        plain = model(torch.randn(2, 3, 16, 16))
    assert len(calls) == 1 and plain.shape == (2, 5)


@pytest.mark.slow  # two runs (~6 s beside other jobs)
def test_a_run_with_act_ckpt_ends_bitwise_as_one_without(tmp_path, logged):
    fast = ["train.batch=16", "train.max_steps=3", "train.threads=1", "data.image_size=16",
            "model.patch_size=4", "train.warmup_epochs=0", "model.drop_path=0.2", "train.knn_k=0"]
    for name, extra in (("plain", []), ("ckpt", ["train.act_ckpt=true"])):
        cfg = apply_overrides(RunConfig(out=str(tmp_path / name)), fast + extra)
        engine.train(cfg)
    assert any(s.startswith("activation checkpointing: ") for s in logged)
    a, b = (load_file(str(at(tmp_path / n, 3) / "model.safetensors")) for n in ("plain", "ckpt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vitscale_bench_act_ckpt_measures_a_checkpointed_training_step(capsys):
    from vitscale.cli import main

    assert main(["bench", "pico/4", "--batch", "2", "--mode", "train", "--warmup", "0", "--iters", "1",
                 "--device", "cpu", "--act-ckpt", "--dtype", "fp16", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["act_ckpt"] is True and row["dtype"] == "fp16" and row["samples_per_s"] > 0


def test_vitscale_bench_act_ckpt_prints_its_table(capsys):
    """(The table once had no column for act_ckpt: a KeyError.)"""
    from vitscale.cli import main

    assert main(["bench", "pico/4", "--batch", "2", "--mode", "train", "--warmup", "0", "--iters", "1",
                 "--device", "cpu", "--act-ckpt"]) == 0
    out = capsys.readouterr().out
    assert "act ckpt" in out and "yes" in out and "activations held for backward" in out


def test_held_for_backward_counts_what_autograd_saves():
    """Linear -> ReLU -> Linear on [B, 8] keeps the input (B x 8) and the ReLU output (B x 16,
    which the second Linear saves too: one storage), float32; the weights are not counted."""
    from vitscale.cost import measure

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert measure.held_for_backward(model, torch.randn(5, 8)) == 4 * 5 * (8 + 16)


def test_a_checkpointed_block_holds_just_its_input():
    """One more checkpointed block holds one more [B, L, D] float32 input, nothing else."""
    from vitscale.cost import measure

    B, cfgs = 3, [preset("pico/4", image_size=16, depth=d) for d in (2, 3)]
    two, three = (measure.held(c, batch=B, device="cpu", act_ckpt=True) for c in cfgs)
    L, D = cfgs[0].num_patches + cfgs[0].num_prefix, cfgs[0].width
    assert three - two == B * L * D * 4
    assert measure.held(cfgs[1], batch=B, device="cpu") > 5 * three  # plain blocks keep far more
