"""The one timing loop the benchmark scripts share (scripts run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_ms(
    fn: Callable[[], object], repeats: int, device: torch.device, *, warmup: int = 1, stat: str = "median",
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Milliseconds of ``fn()``: the median (or ``stat="min"``) of ``repeats`` runs after ``warmup`` runs.

    On CUDA the device is synchronised around each run, so the time is the
    kernels' and not only their launch.  ``clock``: wall time by default;
    ``time.thread_time`` gives the calling thread's CPU time (on the CPU with
    one torch thread, all of the work; another process does not count).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    return 1e3 * (min(times) if stat == "min" else statistics.median(times))
