"""Launcher helpers shared by every kernel family: output allocation (with NaN poisoning), grid arithmetic, masks.

No Triton import here: ``fastalign._backend`` asks :func:`interpreting` before (or without) any kernel module
being imported, and Triton must not be imported before ``TRITON_INTERPRET`` is decided.
"""
from __future__ import annotations

import os

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
