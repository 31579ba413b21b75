"""Real-data augmentation: RandAugment ops against PIL, random erasing and colour jitter against
their definitions, bicubic resizing against PIL, flip / crop defaults, repeated augmentation."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vitscale.common import records
from vitscale.common.errors import UserError
from vitscale.data import DataConfig, EpochSampler, build_datasets, transforms_for
from vitscale.data import randaugment as ra
from vitscale.data.sampler import sample_seeds
from vitscale.data.transforms import ClipTransform, color_jitter, erase_box, random_erase, resized_crop
from vitscale.train import config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # timm's fill: the ImageNet mean in 8 bits


def images(n=6, h=13, w=17, seed=0):
    """uint8 HxWx3 arrays: full-range noise, and low-contrast ones (autocontrast / equalize have work)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(a if k % 2 else (a // 5 + 70).astype(np.uint8))
    return out


def tensor(a):
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


def pil_ops():
    """(name, PIL reference, ours) for each op at a few arguments."""
    cases = [("invert", ImageOps.invert, ra.invert), ("autocontrast", ImageOps.autocontrast, ra.autocontrast),
             ("equalize", ImageOps.equalize, ra.equalize)]
    cases += [(f"posterize{b}", lambda p, b=b: ImageOps.posterize(p, b), lambda x, b=b: ra.posterize(x, b))
              for b in (1, 2, 4, 7)]
    cases += [(f"solarize{t}", lambda p, t=t: ImageOps.solarize(p, t), lambda x, t=t: ra.solarize(x, t))
              for t in (0, 26, 128, 256)]
    for f in (0.1, 0.37, 1.0, 1.9):
        cases += [(f"{n}{f}", lambda p, e=e, f=f: e(p).enhance(f), lambda x, o=o, f=f: o(x, f))
                  for n, e, o in (("color", ImageEnhance.Color, ra.color),
                                  ("contrast", ImageEnhance.Contrast, ra.contrast),
                                  ("brightness", ImageEnhance.Brightness, ra.brightness),
                                  ("sharpness", ImageEnhance.Sharpness, ra.sharpness))]
    for mode, resample in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        for deg in (13.7, -27.0):
            cases.append((f"rotate{deg}{mode}",
                          lambda p, d=deg, r=resample: p.rotate(d, resample=r, fillcolor=FILL),
                          lambda x, d=deg, m=mode: ra.rotate(x, d, FILL, m)))
        for co in ((1, 0.23, 0, 0, 1, 0), (1, 0, 0, -0.3, 1, 0), (1, 0, 3.4, 0, 1, 0), (1, 0, 0, 0, 1, -5.2)):
            cases.append((f"affine{co}{mode}",
                          lambda p, c=co, r=resample: p.transform(p.size, Image.AFFINE, c, resample=r,
                                                                  fillcolor=FILL),
                          lambda x, c=co, m=mode: ra.affine(x, c, FILL, m)))
    return cases


@pytest.mark.parametrize("name,ref,ours", pil_ops(), ids=[c[0] for c in pil_ops()])
def test_each_randaugment_op_is_pils_exactly(name, ref, ours):
    """No rounding slack is needed: the ops follow PIL's integer rules (blend and geometry truncate,
    SMOOTH and the contrast mean round, L = (19595 R + 38470 G + 7471 B + 2**15) >> 16) and compute
    in double where PIL does."""
    for a in images():
        want = np.asarray(ref(Image.fromarray(a)))
        got = ours(tensor(a)).permute(1, 2, 0).numpy()
        assert got.dtype == np.uint8
        assert np.array_equal(got, want), (name, np.abs(got.astype(int) - want).max())


def test_geometry_is_pils_at_random_angles_shears_and_shifts():
    rng = np.random.default_rng(7)
    for _ in range(30):
        a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        pil, x = Image.fromarray(a), tensor(a)
        deg, shear, shift = rng.uniform(-30, 30), rng.uniform(-0.3, 0.3), rng.uniform(-20, 20)
        bicubic, bilinear = Image.BICUBIC, Image.BILINEAR
        pairs = ((pil.rotate(deg, resample=bicubic, fillcolor=FILL), ra.rotate(x, deg, FILL, "bicubic")),
                 (pil.transform(pil.size, Image.AFFINE, (1, 0, 0, shear, 1, 0), bicubic, fillcolor=FILL),
                  ra.affine(x, (1, 0, 0, shear, 1, 0), FILL, "bicubic")),
                 (pil.transform(pil.size, Image.AFFINE, (1, 0, shift, 0, 1, 0), bilinear, fillcolor=FILL),
                  ra.affine(x, (1, 0, shift, 0, 1, 0), FILL, "bilinear")))
        for want, got in pairs:
            assert np.array_equal(np.asarray(want), got.permute(1, 2, 0).numpy())


def test_solarize_add_and_posterize_to_zero_bits_follow_their_definitions():
    a = tensor(images(1)[0])
    want = torch.where(a < 128, (a.int() + 40).clamp(max=255), a.int())  # timm's solarize_add LUT
    assert torch.equal(ra.solarize_add(a, 40).int(), want)
    assert not ra.posterize(a, 0).any() and torch.equal(ra.posterize(a, 8), a)  # keep no bits / all


@pytest.mark.parametrize("name", ra.OPS)
def test_a_clip_gets_each_frames_op_with_one_draw(name):
    """[C, T, H, W]: the same op and argument for every frame, each frame seen as its own image."""
    frames = [tensor(a) for a in images(3)]
    clip = torch.stack(frames, 1)  # [3, T, H, W]
    out = ra._apply(name, clip, 8.0, torch.Generator().manual_seed(5), FILL, "bicubic")
    for t, frame in enumerate(frames):
        one = ra._apply(name, frame, 8.0, torch.Generator().manual_seed(5), FILL, "bicubic")
        assert torch.equal(out[:, t], one)


# timm's level -> argument rules for the 'increasing' ops at magnitude m (0..10), sign s = +-1
TIMM_ARGS = {
    "Rotate": lambda m, s: ("rotate", s * m / 10 * 30),
    "ShearX": lambda m, s: ("shear_x", s * m / 10 * 0.3),
    "TranslateY": lambda m, s: ("translate_y", s * m / 10 * 0.45),
    "Posterize": lambda m, s: ("posterize", 4 - int(m / 10 * 4)),
    "Solarize": lambda m, s: ("solarize", 256 - min(256, int(m / 10 * 256))),
    "Contrast": lambda m, s: ("contrast", max(0.1, 1 + s * m / 10 * 0.9)),
}


@pytest.mark.parametrize("name", sorted(TIMM_ARGS))
def test_magnitude_maps_to_timms_argument(name):
    a = images(1)[0]
    pil = Image.fromarray(a)
    for m, seed in ((9.0, 0), (9.0, 1), (3.5, 2)):
        gen = torch.Generator().manual_seed(seed)
        sign = -1 if torch.rand((), generator=torch.Generator().manual_seed(seed)).item() > 0.5 else 1
        kind, arg = TIMM_ARGS[name](m, sign)
        if kind == "rotate":
            want = pil.rotate(arg, resample=Image.BICUBIC, fillcolor=FILL)
        elif kind in ("shear_x", "translate_y"):
            coeffs = (1, arg, 0, 0, 1, 0) if kind == "shear_x" else (1, 0, 0, 0, 1, arg * pil.size[1])
            want = pil.transform(pil.size, Image.AFFINE, coeffs, Image.BICUBIC, fillcolor=FILL)
        elif kind == "posterize":
            want = ImageOps.posterize(pil, arg)
        elif kind == "solarize":
            want = ImageOps.solarize(pil, arg)
        else:
            want = ImageEnhance.Contrast(pil).enhance(arg)
        got = ra._apply(name, tensor(a), m, gen, FILL, "bicubic")
        assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(want))


def test_randaugment_spec_and_draws():
    policy = ra.RandAugment.parse("rand-m9-mstd0.5-inc1")
    assert policy == ra.RandAugment(magnitude=9, layers=2, magnitude_std=0.5, prob=0.5)
    assert ra.RandAugment.parse("rand-n3-m7-inc1-p1") == ra.RandAugment(7, 3, 0.0, 1.0)
    for bad in ("rand-m9", "rand-m9-mstd0.5", "auto-m9-inc1", "rand-mx-inc1", "rand-m9-inc1-w0"):
        with pytest.raises(ValueError):
            ra.RandAugment.parse(bad)
    x = tensor(images(1)[0])
    before = torch.get_rng_state()
    outs = [policy(x, torch.Generator().manual_seed(s), FILL) for s in (1, 1, 2, 3, 4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(torch.get_rng_state(), before)
    assert any(not torch.equal(o, outs[0]) for o in outs[2:])
    # prob: each drawn op applies with probability 1/2, so both layers are skipped a quarter of the time
    skipped = sum(torch.equal(policy(x, torch.Generator().manual_seed(s), FILL), x) for s in range(400))
    # (or an applied op leaves x as it was: a solarize or posterize at magnitude 0 is rare at m9)
    assert 100 - 4 * math.sqrt(400 * 0.1875) <= skipped <= 100 + 4 * math.sqrt(400 * 0.1875) + 10


def timm_erase_reference(h, w, draws, seed):
    """timm's RandomErasing box drawn with Python's random: (area shares of erased boxes, misses)."""
    rnd = random.Random(seed)
    shares, misses = [], 0
    for _ in range(draws):
        for _ in range(10):
            target = rnd.uniform(0.02, 1 / 3) * h * w
            aspect = math.exp(rnd.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if ew < w and eh < h:
                shares.append(eh * ew / (h * w))
                break
        else:
            misses += 1
    return np.array(shares), misses


def test_erase_box_statistics_match_the_definition():
    h, w, n = 12, 20, 4000
    boxes = [erase_box(h, w, torch.Generator().manual_seed(s)) for s in range(n)]
    got = [b for b in boxes if b is not None]
    assert all(t >= 0 and t + eh <= h and left >= 0 and left + ew <= w and eh < h and ew < w
               for t, left, eh, ew in got)
    shares = np.array([eh * ew / (h * w) for _, _, eh, ew in got])
    aspects = np.array([eh / ew for _, _, eh, ew in got])
    ref, _ = timm_erase_reference(h, w, n, 0)
    se = math.hypot(shares.std() / math.sqrt(len(shares)), ref.std() / math.sqrt(len(ref)))
    assert abs(shares.mean() - ref.mean()) < 4 * se
    assert shares.min() >= 1 / (h * w) and shares.max() <= 1 / 3 + 0.1  # rounding of the sides
    assert aspects.min() >= 0.2 and aspects.max() <= 5  # 0.3..3.3 up to the rounding of small sides
    tops = np.array([t for t, _, eh, _ in got if eh == 4])  # top uniform over 0..h-eh for a given side
    assert set(tops.tolist()) == set(range(h - 4 + 1))


def test_random_erasing_probability_and_pixel_noise():
    x = torch.zeros(3, 2, 24, 24)
    hits, noise = 0, []
    for s in range(1000):
        out = random_erase(x.clone(), 0.25, torch.Generator().manual_seed(s))
        mask = out != 0
        if mask.any():
            hits += 1
            assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[0], mask[2])  # one box for all
            noise.append(out[mask])
    assert abs(hits - 250) < 4 * math.sqrt(1000 * 0.25 * 0.75)
    v = torch.cat(noise)
    assert abs(v.mean().item()) < 0.02 and abs(v.std().item() - 1) < 0.02  # N(0, 1) per pixel


def test_color_jitter_matches_pils_enhance_in_the_drawn_order():
    """Against torchvision's ColorJitter definition computed by PIL's ImageEnhance on the same factors
    and order. PIL truncates to 8 bits after each step (< 1 level) and rounds the contrast mean
    (0.5 level x |1 - f| <= 0.2); a later step scales an earlier error by at most 1.4: the error
    bound is ((1 x 1.4 + 1.2) x 1.4 + 1.2) = 4.84 levels. A wrong weight or order is tens of levels off."""
    for k, a in enumerate(images(4)):
        gen = torch.Generator().manual_seed(k)
        twin = torch.Generator().manual_seed(k)
        factors = [0.6 + 0.8 * torch.rand((), generator=twin).item() for _ in range(3)]
        order = torch.randperm(3, generator=twin).tolist()
        img = Image.fromarray(a)
        for j in order:
            enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[j]
            img = enhance(img).enhance(factors[j])
        got = color_jitter(tensor(a).float() / 255, 0.4, gen)
        diff = (got.permute(1, 2, 0).numpy() * 255 - np.asarray(img)).__abs__().max()
        assert diff <= 4.84, diff


@pytest.mark.parametrize("box,size", [((3, 2, 17, 20), 11), ((0, 0, 23, 31), 40), ((5, 4, 9, 12), 16),
                                      ((2, 3, 20, 5), 12), ((1, 0, 5, 30), 12)])
def test_bicubic_crop_resize_is_pils(box, size):
    rng = np.random.default_rng(1)
    a = rng.random((23, 31)).astype(np.float32)
    t, left, h, w = box
    want = np.asarray(Image.fromarray(a, mode="F").crop((left, t, left + w, t + h)).resize((size, size),
                                                                                          Image.BICUBIC))
    got = resized_crop(torch.from_numpy(a)[None], box, size, "bicubic")[0].numpy()
    assert np.abs(got - np.clip(want, 0, 1)).max() < 1e-5
    # uint8 in, a smooth picture (as photographs are; on noise PIL's clipping between passes shows):
    # PIL rounds after its first pass (0.5 level, times at most 1.25, the a = -0.5 kernel's absolute
    # sum) and after its second (0.5): 1.125 levels
    yy, xx = np.mgrid[0:23, 0:31]
    smooth = 127.5 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 20 * rng.random((23, 31))
    u8 = smooth.round().astype(np.uint8)
    want8 = np.asarray(Image.fromarray(u8).crop((left, t, left + w, t + h)).resize((size, size),
                                                                                  Image.BICUBIC))
    got8 = resized_crop(torch.from_numpy(u8)[None], box, size, "bicubic")[0].numpy() * 255
    assert np.abs(got8 - want8).max() <= 1.125


def test_a_clip_gets_one_augmentation_and_eval_gets_none():
    frame = tensor(images(1, h=40, w=48)[0])
    clip = frame[:, None].repeat(1, 4, 1, 1)  # [3, 4, H, W] of one frame
    tf = ClipTransform(16, MEAN, STD, scale=(0.08, 1.0), flip=True, interpolation="bicubic",
                       randaugment=ra.RandAugment.parse("rand-m9-mstd0.5-inc1"), erase_prob=1.0)
    for s in range(10):
        out = tf(clip, torch.Generator().manual_seed(s))
        erased = out[:, 0] != out[:, 1]  # the noise differs per frame, the box does not
        assert torch.equal(erased, out[:, 2] != out[:, 3]) and erased.any()
        assert torch.equal(out[:, :, ~erased[0]][:, 0], out[:, :, ~erased[0]][:, 3])
        assert torch.equal(out, tf(clip, torch.Generator().manual_seed(s)))  # a pure function of the key
    plain = ClipTransform(16, MEAN, STD, interpolation="bicubic", eval_crop=0.875)
    assert torch.equal(ClipTransform(16, MEAN, STD, scale=(0.08, 1.0), flip=True, interpolation="bicubic",
                                     color_jitter=0.4, erase_prob=1.0, eval_crop=0.875)(frame, None),
                       plain(frame, None))


def test_defaults_by_data():
    digits, moving = DataConfig(), DataConfig(name="moving-digits", frames=4, label="direction")
    real = DataConfig(name="image-folder", path="x")
    assert (digits.flip, moving.flip, real.flip) == (False, False, True)
    assert (digits.resize_mode, real.resize_mode) == ("bilinear", "bicubic")
    assert DataConfig(name="video-folder", path="x", frames=4).flip  # VideoMAE flips video too
    train, _ = transforms_for(digits)  # built-in data trains as before: nothing new switched on
    assert train == ClipTransform(32, (0.5,) * 3, (0.5,) * 3, scale=(0.35, 1.0))
    with pytest.raises(UserError, match="hflip=false"):
        DataConfig(name="moving-digits", frames=4, label="direction", hflip=True)
    for field, value in (("hflip", "maybe"), ("interpolation", "lanczos"), ("randaugment", "rand-m9"),
                         ("erase_prob", 1.5), ("color_jitter", -0.1), ("repeated_aug", 0),
                         ("randaugment", "rand-m11-inc1"), ("real_scale_min", 0.0)):
        with pytest.raises(UserError, match=f"data.{field}"):
            DataConfig(**{field: value})
    cfg = records.apply_overrides(config.RunConfig(),
                                 ["data.hflip=auto", "data.name=image-folder", "data.path=x"])
    assert cfg.data.flip and records.apply_overrides(cfg, ["data.hflip=false"]).data.flip is False


@pytest.mark.parametrize("command,builtin,real", [("pretrain", 0.8, 0.2), ("train", 0.8, 0.08),
                                                  ("finetune", 0.8, 0.08)])
def test_recipes_crop_built_ins_gently_and_real_data_as_mae_and_deit(command, builtin, real):
    cfg = config.recipe(command, init="random")
    assert cfg.data.crop_scale == builtin
    assert records.apply_overrides(cfg, ["data.name=image-folder", "data.path=x"]).data.crop_scale == real
    assert records.apply_overrides(cfg, ["data.scale_min=0.5"]).data.crop_scale == 0.5
    assert DataConfig().crop_scale == 0.35  # a DataConfig of its own keeps the old default


def test_image_folder_items_with_every_augmentation(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k, a in enumerate(images(3, h=30, w=40, seed=ord(c))):
            Image.fromarray(a).save(tmp_path / c / f"{k}.png")
    cfg = DataConfig(name="image-folder", path=str(tmp_path), image_size=16, val_fraction=0.34,
                     randaugment="rand-m9-mstd0.5-inc1", erase_prob=0.25, scale_min=0, repeated_aug=3)
    train, val, *_ = build_datasets(cfg)
    keys = list(EpochSampler(len(train), seed=0, epoch=0, repeats=cfg.repeated_aug))
    items = [train[k]["x"] for k in keys]
    assert all(x.shape == (3, 16, 16) and torch.isfinite(x).all() for x in items)
    assert torch.equal(items[0], train[keys[0]]["x"]) and val[0]["x"].shape == (3, 16, 16)


def deit_ra_sampler(n, repeats, world, rank, per_rank, seed, epoch):
    """DeiT's RASampler with our permutation: repeat each index, pad by wrapping, deal out, keep per_rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    order = [i for i in perm for _ in range(repeats)]
    total = math.ceil(n * repeats / world) * world
    order += order[: total - len(order)]
    return order[rank:total:world][:per_rank]


@pytest.mark.parametrize("n,world", [(12, 1), (10, 4), (7, 3), (9, 2)])
def test_repeated_augmentation_sampler(n, world):
    samplers = [EpochSampler(n, seed=3, epoch=2, rank=r, world=world, repeats=3) for r in range(world)]
    per_rank = math.ceil(n / world)
    for r, s in enumerate(samplers):
        assert len(s) == per_rank  # the epoch keeps its length
        assert s.indices().tolist() == deit_ra_sampler(n, 3, world, r, per_rank, 3, 2)
        keys = s.keys()
        assert keys == list(iter(EpochSampler(n, seed=3, epoch=2, rank=r, world=world, repeats=3)))
        assert list(EpochSampler(n, seed=3, epoch=2, rank=r, world=world, repeats=3, start=2)) == keys[2:]
    everyone = [k for s in samplers for k in list(s)]
    assert len({seed for _, seed in everyone}) == len(everyone)  # every copy is augmented differently
    counts = np.bincount([i for i, _ in everyone], minlength=n)
    assert counts.max() <= 3 + (world > 1)  # at most `repeats` copies (one more where the list wraps)
    if world >= 3:  # copies of an index sit side by side in the order, so they go to different ranks
        for s in samplers:
            assert len(set(s.indices().tolist())) == len(s)
    other = EpochSampler(n, seed=3, epoch=3, world=world, repeats=3).indices().tolist()
    assert other != samplers[0].indices().tolist() or n < 4


def test_one_repeat_is_the_plain_sampler():
    s = EpochSampler(10, seed=4, epoch=1, rank=1, world=3)
    idx = s.indices()
    assert s.keys() == list(zip(idx.tolist(), sample_seeds(4, 1, idx).tolist(), strict=True))
    assert EpochSampler(10, seed=4, epoch=1, rank=1, world=3, repeats=1).keys() == s.keys()
    with pytest.raises(UserError, match="repeats"):
        EpochSampler(10, seed=None, shuffle=False, repeats=2)


@pytest.mark.slow
def test_a_run_with_every_augmentation_resumes_bitwise(tmp_path):
    """Built-in digits with RandAugment, erasing, jitter, flips and repeated augmentation, killed
    mid-epoch after step 2: the resumed run ends with the uninterrupted run's weights, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from vitscale.common.checkpoint import at
    from vitscale.train import engine

    fast = ["train.batch=32", "train.max_steps=4", "train.threads=1", "data.image_size=16",
            "model.patch_size=4", "train.warmup_epochs=0", "train.keep_last=10", "train.ckpt_every=1",
            "train.knn_k=0",
            "data.randaugment=rand-m9-mstd0.5-inc1", "data.erase_prob=0.25", "data.color_jitter=0.4",
            "data.hflip=true", "data.interpolation=bicubic", "data.scale_min=0.5", "data.repeated_aug=3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for out in (whole, killed):
        cfg = records.apply_overrides(config.RunConfig(out=str(out)), fast)
        if out == killed:
            shutil.copytree(whole, killed)
            for gone in (at(killed, 3), at(killed, 4), killed / "best", killed / "final.json"):
                shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
        engine.train(cfg)
    a, b = (load_file(str(at(run, 4) / "model.safetensors")) for run in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
