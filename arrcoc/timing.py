"""The one wall clock arrcoc's timings read (pipeline stages, the HF integration, ``arrcoc eval``)."""

from __future__ import annotations

import time
from typing import Any

import torch


def clock(where: Any = None) -> float:
    """``time.perf_counter()``, after waiting for the CUDA device of ``where`` (a device or a tensor) to finish.

    CUDA kernels run asynchronously: without the synchronisation a time would
    be the launches', not the work's.  Anything else (CPU, ``None``) reads the
    clock at once.
    """
    device = where.device if isinstance(where, torch.Tensor) else where
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
