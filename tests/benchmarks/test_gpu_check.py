"""benchmarks/gpu_check.py (`make gpu-check`): one line and exit 0 without a CUDA device; on the CPU, a dry
run of its stages (a tiny pytest selection, a 2-step training, a one-round bench_vit line) fills the
table and the JSON with each stage's figures."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

NO_CUDA = "gpu-check: no CUDA device; nothing to check here"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_without_a_cuda_device_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_CUDA and not proc.stderr.strip()


def test_the_training_figures_are_the_steady_epochs_medians(tmp_path):
    """The first epoch compiles: its rate is left out, its seconds kept; the losses are the first and last."""
    rows = [{"step": 1, "split": "train", "loss": 2.5}]
    for step, rate, mfu, wait, seconds in ((2, 10.0, 0.01, 0.5, 60.0), (4, 100.0, 0.30, 0.1, 2.0),
                                           (6, 120.0, 0.36, 0.3, 1.8), (8, 110.0, 0.33, 0.2, 1.9)):
        rows += [{"step": step, "split": "train", "loss": 3.0 - step / 4},
                 {"step": step, "split": "val", "samples_per_s": rate, "mfu": mfu, "data_wait": wait,
                  "train_s": seconds}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = gpu_check.training_figures(tmp_path / "metrics.jsonl")
    assert got == {"steps": 8, "samples_per_s": 110.0, "mfu": 0.33, "data_wait": 0.2, "first_epoch_s": 60.0,
                   "first_loss": 2.5, "last_loss": 1.0, "epochs": 4}


def test_it_names_the_packages_this_python_lacks(monkeypatch):
    names = gpu_check.wanted()
    assert {"torch", "numpy", "pillow", "av", "scipy", "pytest", "transformers"} <= set(names)
    assert all(n.replace("-", "").replace("_", "").isalnum() for n in names)  # names, not comments
    monkeypatch.setattr(gpu_check, "wanted", lambda: ["torch", "no-such-package-here"])
    assert gpu_check.missing() == ["no-such-package-here"]


TINY = """
import pytest

@pytest.mark.cuda
def test_kept():
    pass

@pytest.mark.cuda
def test_broken():
    assert False

@pytest.mark.cuda
@pytest.mark.skip(reason="not here")
def test_passed_over():
    pass

def test_not_marked():
    assert False
"""


@pytest.mark.slow  # three stages, each a fresh process (~1 min beside other jobs)
def test_a_cpu_dry_run_fills_the_table_and_the_json(tmp_path, capsys):
    (tmp_path / "test_tiny.py").write_text(TINY)
    out = tmp_path / "check"
    code = gpu_check.main(["--device", "cpu", "--tests", str(tmp_path / "test_tiny.py"), "--preset", "pico/4",
                           "--image-size", "32", "--batch", "8", "--steps", "2", "--val-size", "16",
                           "--no-compile",
                           "--bench-models", "pico/4:8", "--bench-rounds", "1", "--out", str(out)])
    assert code == 1  # the tiny selection's broken test fails the check
    report = json.loads((out / "gpu-check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["tests", "train", "bench eager"] and report["device"] == "cpu"
    assert report["missing"] == []
    assert not report["ok"]
    tests, train, bench = stages["tests"], stages["train"], stages["bench eager"]
    assert not tests["ok"] and tests["figures"] == {"passed": 1, "failed": 1, "skipped": 1,
                                                    "failures": ["test_broken"]}
    figures = train["figures"]
    assert train["ok"] and figures["steps"] == 2 and figures["epochs"] == 2 and figures["mfu"] is None
    assert figures["samples_per_s"] > 0 and math.isfinite(figures["last_loss"])
    assert (Path(figures["run_dir"]) / "final.json").is_file()
    cells = bench["figures"]["cells"]
    assert bench["ok"] and [(c["config"], c["batch"], c["mode"], c["compile"]) for c in cells] == [
        ("pico/4", 8, "train", "off")]
    assert bench["summary"] == f"pico/4 b8 bf16 train: ratio {cells[0]['ratio']:.2f}x"
    printed = capsys.readouterr().out.splitlines()
    top = next(i for i, line in enumerate(printed) if line.split()[:3] == ["stage", "result", "seconds"])
    rows = [(line[:14].strip(), line[15:21].strip()) for line in printed[top + 1:]][:3]  # name, result
    assert rows == [("tests", "FAILED"), ("train", "ok"), ("bench eager", "ok")]
