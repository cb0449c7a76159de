"""GPU datasheet figures: dense peak FLOP/s per dtype class, and the memory of the GPUs `--dry-run` plans.

Plain data (no torch), kept here so that the config (the `--dry-run-gpu` choices), the planner and the
MFU logging in `megatron.model.flops` all read the same numbers.
"""

from __future__ import annotations

# Dense (non-sparse) peak FLOP/s by dtype class, per device-name fragment. `gpu_peak_flops` takes the
# first fragment found in the name, so "H100 PCIe" must precede "H100".
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "tf32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12, "tf32": 35e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12, "tf32": 183e12}),
    ("V100", {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12, "tf32": 15.7e12}),
)

# Memory in bytes of the GPUs `--dry-run-gpu` can name (the 80 GB A100 and the SXM H100/H200).
PLANNER_GPU_MEMORY: dict[str, float] = {"A100": 80e9, "H100": 80e9, "H200": 141e9}


def gpu_peak_flops(device_name: str, dtype_class: str) -> float | None:
    """Dense peak FLOP/s of the GPU called `device_name` (e.g. `torch.cuda.get_device_name()`) computing in
    `dtype_class` ('bf16', 'fp16', 'fp32' or 'tf32'); None when the name matches no entry."""
    for fragment, peaks in GPU_PEAK_FLOPS:
        if fragment in device_name:
            return peaks[dtype_class]
    return None
