"""What the benchmarks share: one timer (synchronised on a GPU) and the name of the machine a figure came from.

Benchmarks run as scripts (``python benchmarks/x.py``), so this folder is on sys.path: ``from _timing import ...``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn()`` takes; on a GPU, from an idle device to the last kernel's end."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model, logical cores, torch threads and load (busy cores skew small ops)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical cores)" if names else platform.processor()
    except OSError:
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}"
