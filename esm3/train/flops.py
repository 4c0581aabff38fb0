"""Model FLOPs utilization: achieved training FLOP/s over the devices' peak.

Training FLOPs per token come from `esm3.model.config.flops_per_token` (6N + 12 L d T);
the peak is the dense BF16 tensor-core rate of the GPU (no sparsity), looked up by name
or given in the config. MFU is not reported on CPU (no meaningful peak).
"""

from __future__ import annotations

import torch

# dense BF16 TFLOP/s per device (vendor data sheets, without sparsity)
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device; None on CPU (or an unknown GPU without an override)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return tf * 1e12
    return None


def mfu(flops_per_token: float, tokens: int, seconds: float, peak: float, devices: int) -> float:
    """Fraction of the devices' peak: flops_per_token * tokens / seconds / (peak * devices)."""
    if seconds <= 0 or peak <= 0 or devices <= 0:
        raise ValueError("seconds, peak and devices must be > 0")
    return flops_per_token * tokens / seconds / (peak * devices)
