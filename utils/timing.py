"""Timing a call on a device: wall time once the device is idle, the median of several calls after warm-ups."""
from __future__ import annotations

import time
from typing import Callable

import torch


def median_seconds(call: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Seconds per call: the median of `repeats` timed calls after `warmup` untimed ones (CUDA synchronised)."""
    times = []
    for index in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
