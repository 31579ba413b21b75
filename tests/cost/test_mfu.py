"""MFU (issue 13): the peak table is matched by the names torch.cuda.get_device_name gives, and MFU
is 2 x multiply-adds x samples/s over the peak (checked on figures worked by hand)."""

import pytest

from vitscale.common import records
from vitscale.common.errors import UserError
from vitscale.cost.mfu import mfu, peak_tflops, table_peak


@pytest.mark.parametrize("name,dtype,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # V100 has no bf16
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("Tesla T4", "fp16", 65.0),
    ("NVIDIA GeForce GTX 1080", "fp32", None),  # not in the table: give a peak
])
def test_the_table_matches_device_names(name, dtype, want):
    assert table_peak(name, dtype) == want


def test_tf32_counts_only_where_matmuls_use_it():
    assert table_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.7
    assert table_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 66.9
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=True) == 989.4


def test_mfu_is_model_flops_over_the_peak():
    # ViT-B/16 at 224 px: 17.56 G multiply-adds forward, ~3x that for a training step
    macs = 3 * 17.56e9
    assert mfu(3000.0, macs, 989.4) == pytest.approx(2 * macs * 3000 / 989.4e12)
    assert 0.3 < mfu(3000.0, macs, 989.4) < 0.33  # 316 TFLOPS of 989
    assert mfu(3000.0, macs, None) is None


def test_a_cpu_has_no_peak_unless_given():
    assert peak_tflops("cpu", "fp32") is None
    assert peak_tflops("cpu", "fp32", override=2.5) == 2.5
    with pytest.raises(UserError, match="positive"):
        peak_tflops("cpu", "fp32", override=-1)


def test_bench_counts_the_models_own_flops_and_gives_mfu_against_a_given_peak(capsys):
    import json

    from vitscale.cli import main
    from vitscale.cost.complexity import cost
    from vitscale.cost.counted import macs_per_sample
    from vitscale.models.presets import preset

    cfg = preset("pico/4")
    c = cost(cfg)
    assert macs_per_sample(cfg, "infer") == c.flops - c.bias_flops  # the cost model's, bias adds aside
    assert 2.9 < macs_per_sample(cfg, "train") / cost(cfg).flops < 3.0  # backward ~2x forward
    assert main(["bench", "pico/4", "--batch", "2", "--warmup", "1", "--iters", "1", "--device", "cpu",
                 "--peak-tflops", "0.5", "--json"]) in (0, None)
    for r in json.loads(capsys.readouterr().out):
        want = 2 * macs_per_sample(cfg, r["mode"]) * r["samples_per_s"] / 0.5e12
        assert r["peak_tflops"] == 0.5 and r["mfu"] == pytest.approx(want)
    assert main(["bench", "pico/4", "--batch", "2", "--warmup", "1", "--iters", "1", "--device", "cpu",
                 "--json"]) in (0, None)
    assert all(r["mfu"] is None for r in json.loads(capsys.readouterr().out))  # a CPU: no table peak


def test_the_training_log_gives_mfu_against_a_given_peak_and_none_on_a_cpu_without(tmp_path):
    from vitscale.cost.complexity import cost
    from vitscale.train import config, engine
    from vitscale.train.metrics import read_metrics

    fast = ["train.batch=32", "train.max_steps=2", "train.threads=1", "train.knn_k=0",
            "train.warmup_epochs=0"]
    rows = {}
    for name, extra in (("given", ["train.peak_tflops=0.001"]), ("none", [])):
        cfg = records.apply_overrides(config.RunConfig(out=str(tmp_path / name)), fast + extra)
        engine.train(cfg)
        rows[name] = [r for r in read_metrics(tmp_path / name) if r["split"] == "val"][-1]
    assert "mfu" not in rows["none"]
    c = cost(config.RunConfig().model.replace(num_classes=10))
    per_sample = 2 * 3 * (c.flops - c.bias_flops)  # ~3 x the forward's multiply-adds, as flops
    got = rows["given"]["mfu"] * 0.001e12 / rows["given"]["samples_per_s"]  # flops per sample
    assert 0.95 < got / per_sample < 1.02
