"""The one timing loop the benchmark scripts share (scripts run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(
    fn: Callable[[], object], repeats: int, device: torch.device, *, warmup: int = 1, stat: str = "median"
) -> float:
    """Milliseconds of ``fn()``: the median (or ``stat="min"``) of ``repeats`` runs after ``warmup`` runs.

    On CUDA the device is synchronised around each run, so the time is the
    kernels' and not only their launch.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * (min(times) if stat == "min" else statistics.median(times))
