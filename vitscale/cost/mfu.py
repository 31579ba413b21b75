"""Model flops utilisation (MFU; Chowdhery et al. 2022): the model's own flops per second (2 x its
multiply-adds, forward and backward for a training step, as FlopCounterMode counts them; no
recomputation) over the device's dense peak for the dtype it runs in.

Peaks are the vendors' dense tensor-core figures (no structured sparsity) in TFLOPS; fp32 is the
non-tensor-core rate, as PyTorch leaves TF32 matmuls off by default (tf32 where they are on).
A GPU not in the table, or a CPU, has no MFU unless a peak is given (train.peak_tflops,
`vitscale bench --peak-tflops`).
"""

from __future__ import annotations

import torch

from vitscale.common.errors import UserError

# (name fragments that must all appear in torch.cuda.get_device_name, peaks by dtype); first match wins,
# so more specific entries come first (H100 PCIe before H100, A100 before A10, L40S before L4)
PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H100", "PCIE"), {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (("H100", "NVL"), {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (("H100",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("H200",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (("V100", "PCIE"), {"fp16": 112.0, "fp32": 14.0}),
    (("V100",), {"fp16": 125.0, "fp32": 15.7}),
    (("L40S",), {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (("L4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (("A10",), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (("T4",), {"fp16": 65.0, "fp32": 8.1}),
)


def peak_tflops(device: torch.device | str, dtype: str, override: float = 0.0) -> float | None:
    """The dense peak of `device` for `dtype` (fp32 | bf16 | fp16) in TFLOPS: `override` if given,
    else the table's for a known CUDA GPU, else None."""
    if override < 0:
        raise UserError(f"a peak of {override:g} TFLOPS is not a peak; give a positive figure "
                        "(0 = the table's)")
    if override:
        return override
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return table_peak(torch.cuda.get_device_name(device), dtype, torch.backends.cuda.matmul.allow_tf32)


def table_peak(name: str, dtype: str, tf32: bool = False) -> float | None:
    """The table's peak for a GPU named `name` (as torch.cuda.get_device_name says it)."""
    upper = name.upper()
    for fragments, peaks in PEAKS:
        if all(f in upper for f in fragments):
            key = "tf32" if dtype == "fp32" and tf32 and "tf32" in peaks else dtype
            return peaks.get(key)
    return None


def mfu(samples_per_s: float, macs_per_sample: float, peak: float | None) -> float | None:
    """Model flops utilisation in [0, 1]: 2 x multiply-adds per sample x samples/s over `peak`
    TFLOPS; None without a peak."""
    if not peak:
        return None
    return 2.0 * macs_per_sample * samples_per_s / (peak * 1e12)
