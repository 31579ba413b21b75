"""The checkpointer's own state dicts for a module no rank shards (plain, compiled, DDP's) against
DCP's get_state_dict / set_state_dict, the reference (a run imports DCP only to shard): the same
keys, equal tensors, the same param groups, and the same module and optimizer once set back."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from vitscale.common import checkpoint
from vitscale.models.vit import ViT, ViTConfig
from vitscale.train import optim
from vitscale.train.checkpointer import full_state, set_full_state

CFG = ViTConfig(image_size=8, patch_size=4, width=32, depth=2, heads=2, num_classes=5)
# what the checkpointer passes DCP to save a module whole on rank 0
SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A one-rank gloo process group, so that DDP can wrap a module in this process."""
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trained(name: str, seed: int, steps: int = 1):
    """A small ViT and its optimizer (vitscale's param groups: layer decay, no decay on norms)
    after `steps` steps, so that the optimizer holds state."""
    torch.manual_seed(seed)
    model = ViT(CFG)
    opt = optim.build(name, optim.param_groups(model, 0.05, 0.75, CFG.depth), (0.9, 0.999))
    for _ in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_scale"]
        model(torch.randn(4, 3, 8, 8)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def wrapped(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """`model` as a run may hold it; compiling wraps only (nothing is compiled before a forward)."""
    if how == "ddp":
        return DistributedDataParallel(model)
    return torch.compile(model) if how == "compiled" else model


def assert_same(mine, theirs, where="", ordered=True) -> None:
    """Equal nested state: dicts with the same keys (in the same order if `ordered`; a state read
    back from files has each parameter's in the files' order), tensors equal in value, dtype and
    device, everything else equal."""
    assert type(mine) is type(theirs), where
    if isinstance(mine, dict):
        assert list(mine) == list(theirs) if ordered else sorted(mine) == sorted(theirs), where
        for k in mine:
            assert_same(mine[k], theirs[k], f"{where}/{k}", ordered)
    elif isinstance(mine, list | tuple):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_same(a, b, f"{where}[{i}]", ordered)
    elif isinstance(mine, torch.Tensor):
        assert (mine.dtype, mine.device, mine.shape) == (theirs.dtype, theirs.device, theirs.shape), where
        assert torch.equal(mine, theirs), where
    else:
        assert mine == theirs, where


@pytest.mark.parametrize("name", ["adamw", "lars"])
@pytest.mark.parametrize("how", ["plain", "compiled", "ddp"])
def test_full_state_is_dcps_and_sets_back_as_dcp_does(how, name, request, tmp_path):
    if how == "ddp":
        request.getfixturevalue("group")
    model, opt = trained(name, seed=0)
    module = wrapped(model, how)
    mine = full_state(module, opt)
    assert_same(mine, get_state_dict(module, opt, options=SAVE))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in mine[0])
    assert mine[1]["state"] and set(mine[1]["state"]) <= set(mine[0])

    # set back as a resume does: from the checkpoint's files, into other weights and state
    saved = checkpoint.load(checkpoint.save(tmp_path, 1, *mine, {"step": 1}))
    ours, theirs = (trained(name, seed=1, steps=2) for _ in range(2))
    ours = wrapped(ours[0], how), ours[1]
    theirs = wrapped(theirs[0], how), theirs[1]
    set_full_state(*ours, saved.model, saved.optim)
    set_state_dict(*theirs, model_state_dict=saved.model, optim_state_dict=saved.optim,
                   options=StateDictOptions(full_state_dict=True))
    again = full_state(*ours)
    assert_same(again[0], mine[0])
    assert_same(again[1]["state"], mine[1]["state"], ordered=False)
    assert_same(ours[1].state_dict(), theirs[1].state_dict(), ordered=False)
    assert_same(ours[0].state_dict(), theirs[0].state_dict())


def test_setting_a_state_without_a_trainable_parameters_state_fails_as_dcps_does():
    model, opt = trained("adamw", seed=0)
    model_state, optim_state = full_state(model, opt)
    del optim_state["state"]["head.weight"]
    with pytest.raises(RuntimeError, match="head.weight"):
        set_state_dict(*trained("adamw", seed=1), model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    with pytest.raises(RuntimeError, match="head.weight"):
        set_full_state(*trained("adamw", seed=1), model_state, optim_state)
