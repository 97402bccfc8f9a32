"""How long one call takes: median / p20 / p80 / min / max in ms over repeated calls.

- CUDA, ``timer="events"`` (default): CUDA events around each call with L2 flushed before it (do_bench's method,
  with the repetition count taken from a warm call so that 0.5 s calls are not repeated a dozen times).
- CUDA, ``timer="do_bench"``: ``triton.testing.do_bench(..., return_mode="all")``.
- CPU: wall clock (``time.perf_counter``) over a few calls after a warm-up, summarised the same way.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

TIMERS = ("events", "do_bench")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str  # "cuda-events" | "cuda-do_bench" | "cpu-wall-clock"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clear_grads(tensors: list[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def summarize(samples: list[float], method: str) -> Timing:
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return Timing(statistics.median(s), q(0.2), q(0.8), s[0], s[-1], len(s), method)


_summary = summarize  # the earlier name


def measure_time(fn: Callable[[], Any], device: torch.device, *, budget_s: float = 2.0, max_reps: int | None = None,
                 grad_to_none: list[torch.Tensor] | None = None, first_s: float | None = None,
                 timer: str = "events") -> Timing:
    """Time ``fn`` (one full call: e.g. forward+backward); ``budget_s`` bounds the time spent in timed calls.

    ``first_s``: the duration of a call already made (the agreement check), which then serves as the warm-up.
    ``timer``: how CUDA calls are timed (``TIMERS``; CPU calls always use the wall clock).
    CUDA events: one more warm call estimates the duration (the first may have compiled or autotuned), then
    ``budget_s / estimate`` calls (3..200), each timed with CUDA events after flushing L2 by writing a 256 MiB
    buffer, as ``triton.testing.do_bench`` does (its fixed 5-call estimate and warm-up cost too much for the
    0.2-0.6 s calls of the large cases). CPU: wall clock over ``budget_s / first_s`` calls (2..50).
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    if device.type == "cuda" and timer == "do_bench":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=max(50, int(1000 * budget_s)),
                                        grad_to_none=grad_to_none, return_mode="all")
        return summarize([float(x) for x in times], "cuda-do_bench")
    if device.type == "cuda":
        def wall():
            clear_grads(grad_to_none)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        if first_s is None:
            wall()
        est = wall()
        reps = int(max(3, min(max_reps or 200, budget_s / max(est, 1e-6))))
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            clear_grads(grad_to_none)
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        del flush
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")
    if first_s is None:  # CPU warm-up
        clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
    reps = int(max(2, min(max_reps or 50, budget_s / max(first_s, 1e-6))))  # 2+: one sample is all noise here
    samples = []
    for _ in range(reps):
        clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append(1000.0 * (time.perf_counter() - t0))
    return summarize(samples, "cpu-wall-clock")
