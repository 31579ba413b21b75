"""benchmarks/bench_vit.py and `vitscale bench --compile` (issue 13): the transformers peer has
vitscale's shape and runs SDPA attention, a quick run yields a row per side for compile off and
on, and MFU is absent on a CPU unless a peak is given, then equal to its closed form with the
multiply-adds FlopCounterMode counts on the peer itself. Figures that hold by construction,
not timings."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("transformers")
import bench_vit as bv  # noqa: E402

from vitscale.cli import main as cli_main  # noqa: E402
from vitscale.cost import (
    counted,
    measure,  # noqa: E402
)
from vitscale.models.presets import preset  # noqa: E402


def peer_macs_per_sample(mode: str, batch: int = 2) -> float:
    """Multiply-adds per sample of pico/4's HF peer, counted on the peer itself. On meta tensors, as
    vitscale.cost.counted counts: there SDPA runs its math path, whose matmuls FlopCounterMode counts
    (on real CPU tensors it does not count the CPU flash-attention kernel at all)."""
    cfg = preset("pico/4")
    with torch.device("meta"):
        peer = bv.hf_peer(cfg)
        x = measure.example_input(cfg, batch, "meta")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            bv.hf_loss(peer.train()(x)).backward()
        else:
            with torch.no_grad():
                peer.eval()(x)
    return counter.get_total_flops() / 2 / batch


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_peer_computes_as_many_multiply_adds(mode):
    # vitscale's count is the one both sides' MFU uses
    assert peer_macs_per_sample(mode) == counted.macs_per_sample(preset("pico/4"), mode)


def test_peer_attends_with_sdpa(monkeypatch):
    cfg, calls = preset("pico/4"), []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    _, peer, _ = bv.build_pair(cfg, torch.device("cpu"), 0)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        peer.eval()(measure.example_input(cfg, 2))
    tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2  # cls + patches
    assert calls == [(2, cfg.heads, tokens, cfg.width // cfg.heads)] * cfg.depth  # once per block


def test_compile_list_is_checked():
    assert bv.parse_args(["--compile", "on,off"]).compile == ("on", "off")
    with pytest.raises(SystemExit):
        bv.parse_args(["--compile", "maybe"])
    with pytest.raises(SystemExit):
        bv.parse_args(["--dtype", "fp8"])
    s16, pico = bv.chosen("S/16:8, pico/4:64", "cpu")
    assert (s16.preset, s16.batch, pico.preset, pico.batch) == ("S/16", 8, "pico/4", 64)
    assert s16.rounds == bv.SETTINGS["cpu"][0].rounds
    with pytest.raises(SystemExit, match="PRESET:BATCH"):
        bv.chosen("S/16", "cpu")


def quick(tmp_path: Path, *extra: str) -> list[dict]:
    """The cells of a one-round pico/4 b8 fp32 run on the CPU."""
    out = tmp_path / "cells.json"
    assert bv.main(["--models", "pico/4:8", "--device", "cpu", "--dtype", "fp32", "--rounds", "1",
                    "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())["cells"]


@pytest.mark.slow
def test_quick_run_times_both_sides_compiled_and_not(tmp_path, capsys):
    # aot_eager: dynamo and AOTAutograd as inductor sees them, without its C++ build (minutes here)
    cells = quick(tmp_path, "--compile", "off,on", "--compile-backend", "aot_eager", "--peak-tflops", "2")
    out = capsys.readouterr().out
    assert [(c["compile"], c["mode"]) for c in cells] == [("off", "infer"), ("off", "train"),
                                                          ("on", "infer"), ("on", "train")]
    peer_macs = {mode: peer_macs_per_sample(mode) for mode in ("infer", "train")}
    for c in cells:
        macs = peer_macs[c["mode"]]
        assert c["macs_per_sample"] == macs and c["peak_tflops"] == 2.0
        for name in ("vitscale", "hf"):
            side = c[name]
            assert side["mfu"] == pytest.approx(2 * macs * side["samples_per_s"] / 2e12, rel=1e-12)
            assert ("compile_s" in side) == (c["compile"] == "on")
        assert c["ratio"] == pytest.approx(c["vitscale"]["samples_per_s"] / c["hf"]["samples_per_s"])
        assert f"compile {c['compile']}: vitscale" in out
    assert "MFU vitscale" in out and out.count("compile on / off, pico/4 b8 fp32") == 2
    on_train, off_train = cells[3], cells[1]
    mixed = on_train["vitscale"]["samples_per_s"] / off_train["hf"]["samples_per_s"]
    assert "train: vitscale" in out and f"(vitscale on / hf off {mixed:.2f}x)" in out

    cells = quick(tmp_path, "--compile", "off")  # a CPU has no peak in the table
    assert [c["compile"] for c in cells] == ["off", "off"]
    assert all(c["peak_tflops"] is None and c[s]["mfu"] is None for c in cells for s in ("vitscale", "hf"))
    assert "MFU" not in capsys.readouterr().out


@pytest.mark.slow
def test_cli_bench_compile_compiles_the_model(monkeypatch, capsys):
    real, calls = torch.compile, []

    def compile_eagerly(model, **kwargs):  # inductor's C++ build takes minutes on a CPU
        calls.append(model)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    code = cli_main(["bench", "pico/4", "--batch", "2", "--iters", "1", "--warmup", "1", "--device", "cpu",
                     "--compile", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code in (0, None) and len(calls) == 2
    assert [r["mode"] for r in rows] == ["infer", "train"] and all(r["compile"] for r in rows)
    assert all(r["warmup_s"] > 0 and r["samples_per_s"] > 0 for r in rows)
