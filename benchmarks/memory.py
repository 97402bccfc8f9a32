"""Peak memory of one call above what was allocated before it (inputs are allocated before, so this is "peak
above inputs"; outputs and gradients the call creates count).

On CUDA: ``max_memory_allocated`` during the call minus ``memory_allocated`` before it. On CPU there is no
allocator counter: after ``malloc_trim(0)`` the process RSS is sampled every millisecond during the call and
peak minus before is reported, labelled ``cpu-rss-sampled`` — approximate (the allocator may reuse pages it kept,
so small results read as 0) and not comparable to GPU figures.
"""
from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .timing import clear_grads


@dataclass
class Memory:
    peak_above_inputs_bytes: int | None
    method: str  # "cuda-max_memory_allocated" | "cpu-rss-sampled" | "n/a"


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(fn: Callable[[], Any], device: torch.device,
                   grad_to_none: list[torch.Tensor] | None = None) -> Memory:
    """Peak memory of one call of ``fn`` above what was allocated before it (outputs kept by ``fn`` count)."""
    clear_grads(grad_to_none)
    if device.type == "cuda":
        gc.collect()  # ~0.3 s with transformers loaded: worth it only where an allocator counter is read
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        clear_grads(grad_to_none)
        return Memory(int(peak), "cuda-max_memory_allocated")
    if not os.path.exists("/proc/self/statm"):
        return Memory(None, "n/a")
    _malloc_trim()  # hand freed heap pages back first, so that the RSS growth reflects this call's allocations
    before = _rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
        peak[0] = max(peak[0], _rss_bytes())
    finally:
        stop.set()
        th.join()
    del out
    clear_grads(grad_to_none)
    return Memory(int(max(0, peak[0] - before)), "cpu-rss-sampled")
