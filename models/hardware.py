"""What this machine's CPU does fast: decides whether bf16 autocast helps or hurts.

bf16 autocast roughly doubles training throughput on CPUs with native bf16 (AVX512-BF16,
AMX), but on AVX2-only CPUs PyTorch emulates bf16 matmuls and they run ~50-100x slower than
fp32 (measured here: 0.9 vs 74 GFLOP/s on a 1024^2 matmul). A recipe's `precision: auto`
therefore asks this module instead of assuming.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def cpu_bf16_is_fast(size: int = 256, repeats: int = 3) -> bool:
    """True when a bf16 matmul on this CPU is not slower than fp32 (a ~10 ms measurement, cached)."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up: first call selects kernels
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - started
    return timings[torch.bfloat16] <= timings[torch.float32]


def resolve_precision(requested: str) -> str:
    """Lightning precision for `requested`; `auto` = bf16-mixed on GPUs and on CPUs with fast bf16."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_bf16_is_fast() else "32-true"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype that matches a resolved Lightning precision (None = plain fp32)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
