"""Timing, memory, agreement and environment capture shared by every benchmark case.

One measurement = one implementation of one case on one device:

- time: on CUDA, CUDA events around each call with L2 flushed before it (do_bench's method, with the repetition
  count taken from a warm call so that 0.5 s calls are not repeated a dozen times), summarised as median / p20 /
  p80 / min / max in ms; on CPU, wall clock (``time.perf_counter``) over a few calls after a warm-up, the same way.
- memory: on CUDA, ``max_memory_allocated`` during one call minus ``memory_allocated`` before it (inputs are
  allocated before, so this is "peak above inputs"; outputs and gradients the call creates count). On CPU there is
  no allocator counter: after ``malloc_trim(0)`` we sample the process RSS every millisecond during one call and
  report peak minus before, labelled ``cpu-rss-sampled`` — approximate (the allocator may reuse pages it kept, so
  small results read as 0) and not comparable to GPU figures.
- agreement: every implementation's outputs are compared with a high-precision truth before timing; the max
  absolute deviation of each output is recorded, and ``ok`` follows DESIGN.md's rule
  ``|impl - truth| <= 2 * |torch_same_dtype - truth| + atol``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import os
import platform
import signal
import statistics
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

ATOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


GPU_TIMER = "events"  # "events" (below) | "do_bench" (triton.testing.do_bench, return_mode="all"); set by --timer


class CaseTimeout(Exception):
    """Raised by :func:`time_limit` when one implementation runs past its share of the budget."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Interrupt Python code after ``seconds`` (SIGALRM; main thread only). A CUDA kernel in flight finishes first,
    so the limit is honoured at the next Python bytecode — enough to stop a slow peer's timing loop."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ timing

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str  # "cuda-events" | "cpu-wall-clock"


def _summary(samples: list[float], method: str) -> Timing:
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return Timing(statistics.median(s), q(0.2), q(0.8), s[0], s[-1], len(s), method)


def measure_time(fn: Callable[[], Any], device: torch.device, *, budget_s: float = 2.0, max_reps: int | None = None,
                 grad_to_none: list[torch.Tensor] | None = None, first_s: float | None = None) -> Timing:
    """Time ``fn`` (one full call: e.g. forward+backward); ``budget_s`` bounds the time spent in timed calls.

    ``first_s``: the duration of a call already made (the agreement check), which then serves as the warm-up.
    CUDA: one more warm call estimates the duration (the first may have compiled or autotuned), then
    ``budget_s / estimate`` calls (3..200), each timed with CUDA events after flushing L2 by writing a 256 MiB
    buffer, as ``triton.testing.do_bench`` does (its fixed 5-call estimate and warm-up cost too much for the
    0.2-0.6 s calls of the large cases). CPU: wall clock over ``budget_s / first_s`` calls (2..50).
    """
    if device.type == "cuda" and GPU_TIMER == "do_bench":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=25, rep=max(50, int(1000 * budget_s)),
                                        grad_to_none=grad_to_none, return_mode="all")
        return _summary([float(x) for x in times], "cuda-do_bench")
    if device.type == "cuda":
        def wall():
            _clear(grad_to_none)
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
            _clear(grad_to_none)
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        del flush
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")
    if first_s is None:  # CPU warm-up
        _clear(grad_to_none)
        t0 = time.perf_counter()
        fn()
        first_s = time.perf_counter() - t0
    reps = int(max(2, min(max_reps or 50, budget_s / max(first_s, 1e-6))))  # 2+: one sample is all noise here
    samples = []
    for _ in range(reps):
        _clear(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append(1000.0 * (time.perf_counter() - t0))
    return _summary(samples, "cpu-wall-clock")


def _clear(tensors: list[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


# ------------------------------------------------------------------------------------------------------ memory

def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Memory:
    peak_above_inputs_bytes: int | None
    method: str  # "cuda-max_memory_allocated" | "cpu-rss-sampled" | "n/a"


def measure_memory(fn: Callable[[], Any], device: torch.device,
                   grad_to_none: list[torch.Tensor] | None = None) -> Memory:
    """Peak memory of one call of ``fn`` above what was allocated before it (outputs kept by ``fn`` count)."""
    _clear(grad_to_none)
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
        _clear(grad_to_none)
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
    _clear(grad_to_none)
    return Memory(int(max(0, peak[0] - before)), "cpu-rss-sampled")


# --------------------------------------------------------------------------------------------------- agreement

_CHUNK_ELEMS = 1 << 24  # compare in slices: a float64 copy of a (151936, 3584) gradient would be 4.4 GB


def max_abs_dev(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(-1), b.reshape(-1)
    worst = 0.0
    for s in range(0, a.numel(), _CHUNK_ELEMS):
        d = float((a[s:s + _CHUNK_ELEMS].double() - b[s:s + _CHUNK_ELEMS].double()).abs().max())
        if d != d:  # NaN
            return float("nan")
        worst = max(worst, d)
    return worst


def abs_max(t: torch.Tensor) -> float:
    t = t.reshape(-1)
    return max((float(t[s:s + _CHUNK_ELEMS].abs().max()) for s in range(0, t.numel(), _CHUNK_ELEMS)), default=0.0)


def agreement(outputs: dict[str, torch.Tensor], truth: dict[str, torch.Tensor],
              baseline_dev: dict[str, float] | None, dtype: torch.dtype) -> tuple[dict[str, float], bool]:
    """Max |impl - truth| per output, and whether each is within 2x the same-dtype baseline's error + atol.

    The atol is relative to the largest |truth| of that output (gradients of a sum over 10^4 tokens are large)."""
    devs, ok = {}, True
    for name, ref in truth.items():
        if name not in outputs or outputs[name] is None:
            continue
        dev = max_abs_dev(outputs[name], ref)
        devs[name] = dev
        scale = max(1.0, abs_max(ref))
        allowed = ATOL.get(dtype, 1e-2) * scale + 2.0 * ((baseline_dev or {}).get(name) or 0.0)
        if not (dev <= allowed):  # also catches NaN
            ok = False
    return devs, ok


# ------------------------------------------------------------------------------------------------- environment

def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod, key in [("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                     ("liger_kernel", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy"),
                     ("fastalign", "fastalign"), ("numpy", "numpy")]:
        try:
            m = importlib.import_module(mod)
            out[key] = getattr(m, "__version__", None) or _dist_version(mod)
        except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the run
            out[key] = f"missing ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return out


def _dist_version(mod: str) -> str | None:
    from importlib import metadata

    for name in (mod, mod.replace("_", "-")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, card_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda_version=torch.version.cuda)
    else:
        info["card"] = "CPU (no GPU)"
    return info


def git_commit() -> str | None:
    """The commit measured: ``git rev-parse HEAD`` (with ``+dirty`` when fastalign's sources differ from it), or
    ``$FASTALIGN_COMMIT`` for an exported tree without .git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastalign", "kernels", "csrc"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTALIGN_COMMIT")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------------------------------ floors

def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure_time(lambda: dst.copy_(src), device, budget_s=0.5, max_reps=20)
    del src, dst
    return 2 * nbytes / (t.min_ms / 1000.0)


@dataclass
class Row:
    """One implementation's result in one case (serialised into the JSON)."""

    impl: str
    status: str  # "ok" | "missing" | "error" | "timeout" | "skipped"
    detail: str = ""
    time: dict | None = None
    memory: dict | None = None
    deviation: dict | None = None
    agrees: bool | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first[:300]}"


def format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-2000:]
