"""Launcher helpers shared by every kernel family: output allocation (with NaN poisoning), grid arithmetic, masks.

No Triton import here: ``fastalign._backend`` asks :func:`interpreting` before (or without) any kernel module
being imported, and Triton must not be imported before ``TRITON_INTERPRET`` is decided.
"""
from __future__ import annotations

import os
import time

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels load; fp64 is torch-only


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def poisoning() -> bool:
    """``FASTALIGN_POISON=1`` fills kernel outputs with NaN before launch, so unwritten values show up in tests."""
    return os.environ.get("FASTALIGN_POISON", "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device, *, fill: float | None = None) -> torch.Tensor:
    """A buffer a kernel writes: all NaN under ``FASTALIGN_POISON=1``, else ``fill`` (None: uninitialised)."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def kernel_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A pointer-able mask: bool is read as uint8 (same bytes, no copy); None stays None (the kernel's HAS_MASK)."""
    if mask is None:
        return None
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def present(arg: str):
    """A ``triton.heuristics`` rule: the flag is True when the launcher passes tensor/value ``arg``, False for None
    (a None argument is specialised as a constexpr, so its branch is compiled out; no stand-in pointer needed)."""
    return lambda args: args[arg] is not None


# ------------------------------------------------------------------------------------------ the head's memory budget
# How many bytes the LM head (fastalign.linear_logprobs and the fused losses) may hold for [chunk, V] logits:
# ``memory_budget=`` of a call, else FASTALIGN_HEAD_BUDGET, else a fraction of the memory free now.
HEAD_BUDGET_ENV = "FASTALIGN_HEAD_BUDGET"
GPU_BUDGET_FRACTION = 0.5  # of the device's free memory: cudaMemGetInfo's free + blocks torch caches but does not use
CPU_BUDGET_FRACTION = 0.25  # of the RAM the OS reports available (MemAvailable; total physical RAM where unknown)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, *, name: str = HEAD_BUDGET_ENV) -> int:
    """A byte count from an int or a string: ``"1073741824"``, ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"64k"``
    (k/M/G/T decimal, KiB/MiB/GiB/TiB binary, case-insensitive). Raises ValueError naming ``name`` for anything
    else, negative values included."""
    import re

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a byte count (an int, or a string such as '512MiB'), got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{name} must be a byte count such as 1073741824, 512MiB or 2GiB (units: B, k/KB, M/MB, G/GB, "
                f"T/TB, KiB, MiB, GiB, TiB), got {value!r}"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
    return int(number * _UNITS[unit])


# MemAvailable, re-read at most this often: the file read costs about as much as a small op, on every call
RAM_READ_INTERVAL_S = 1.0
_ram_reading: list = [float("-inf"), 0]  # [monotonic time of the reading, bytes]


def _available_ram() -> int:
    now = time.monotonic()
    if now - _ram_reading[0] < RAM_READ_INTERVAL_S:
        return _ram_reading[1]
    _ram_reading[:] = [now, _read_available_ram()]
    return _ram_reading[1]


def _read_available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_head_budget(device) -> int:
    """The budget when neither the call nor the environment gives one: GPU_BUDGET_FRACTION of the CUDA device's
    free memory (torch's cached, unused blocks count as free), CPU_BUDGET_FRACTION of available RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(GPU_BUDGET_FRACTION * (free + max(0, cached)))
    return int(CPU_BUDGET_FRACTION * _available_ram())


def head_memory_budget(device) -> int:
    """The head's budget in bytes on ``device`` when a call gives none: ``FASTALIGN_HEAD_BUDGET`` if set (a byte
    count, see :func:`parse_bytes`; a bad value is a ValueError naming the variable), else
    :func:`default_head_budget`."""
    text = os.environ.get(HEAD_BUDGET_ENV, "").strip()
    if text:
        return parse_bytes(text, name=HEAD_BUDGET_ENV)
    return default_head_budget(device)
