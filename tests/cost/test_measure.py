"""Measured cost and the command line."""

import json

import pytest
import torch

from vitscale.cli import main
from vitscale.cost import measure as bench
from vitscale.cost.complexity import cost
from vitscale.models import preset


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_measure_reports_positive_consistent_numbers(mode, dtype):
    m = bench.measure(preset("pico/4"), batch=4, mode=mode, dtype=dtype, device="cpu", warmup=1, iters=2)
    assert m.samples_per_s == pytest.approx(4 / (m.ms_per_step / 1000))
    assert m.peak_mem_mb > 0 and m.device == "cpu"


def test_train_step_changes_the_weights():
    cfg = preset("pico/4")
    model = torch.nn.Linear(3, 3)
    step = bench.make_step(model, torch.randn(4, 3), "train", torch.device("cpu"), "fp32")
    before = model.weight.detach().clone()
    step()
    assert not torch.equal(before, model.weight)
    assert bench.example_input(cfg, 2).shape == (2, 3, 32, 32)


def test_bad_device_and_dtype_are_clear():
    with pytest.raises(ValueError, match="dtype"):
        bench.autocast(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            bench.pick_device("cuda")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_lists_presets_with_their_cost(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["B/16"]["flops"] == cost(preset("B/16")).flops
    assert rows["S/16-f16"]["frames"] == 16


def test_models_and_cost_tables(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "B/16" in out and "86.57" in out and "17.580" in out
    code, out, _ = run_cli(capsys, "cost", "B/16", "--image-size", "384")
    assert code == 0 and "577" in out  # 24 x 24 patches + cls


def test_cost_video_overrides(capsys):
    code, out, _ = run_cli(capsys, "cost", "S/16-f16", "--frames", "8", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 4 * 196 + 1


def test_scale_json_reports_achieved_factors_and_exponents(capsys):
    code, out, _ = run_cli(capsys, "scale", "S/16", "--strategy", "d,w", "--factors", "1,2,4", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["records"]) == 6
    assert set(result["acts_exponent"]) == {"d", "w"}
    assert all(abs(r["achieved"] / r["target"] - 1) < 0.05 for r in result["records"])


def test_scale_measure_prints_correlations(capsys):
    code, out, _ = run_cli(capsys, "scale", "pico/4", "--strategy", "d,w", "--factors", "1,2",
                           "--measure", "--batch", "2", "--iters", "1", "--device", "cpu")
    assert code == 0 and "samples/s" in out and "Pearson" in out and "acts" in out


def test_bench_json(capsys):
    code, out, _ = run_cli(capsys, "bench", "pico/4", "--batch", "2", "--iters", "1", "--warmup", "0",
                           "--device", "cpu", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["mode"] for r in rows] == ["infer", "train"]


@pytest.mark.parametrize("argv", [
    ["cost", "X/16"],
    ["cost", "B/16", "--image-size", "385"],
    ["scale", "S/16", "--strategy", "q"],
    ["scale", "S/16", "--strategy", "t"],
    ["scale", "S/16", "--factors", "0"],
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vitscale: error:")


def test_cli_module_runs_without_traceback():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vitscale", "cost", "B/17"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "divisible" in r.stderr
