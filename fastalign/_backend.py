"""One place that decides which implementation runs a call: ``torch`` | ``triton`` | ``cuda`` | ``cpp``.

- ``torch``: the pure-PyTorch reference in :mod:`fastalign.reference` (any device; the CPU path without the
  extension). The RL losses run their closed-form torch path instead (:mod:`fastalign.ops.rl`): the same results
  without an autograd graph over many small ops.
- ``triton``: the Triton kernels in :mod:`fastalign.kernels`. Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Triton was imported (that is how the tests exercise the kernels on CPU).
- ``cuda`` / ``cpp``: the optional compiled extension ``fastalign._C`` (CUDA kernels for CUDA tensors, C++ for
  CPU tensors), only for the ops that have one.
- ``auto`` (default; ``FASTALIGN_BACKEND`` overrides it): CUDA tensors -> ``triton`` (or the extension, for ops
  that prefer it when built); CPU tensors -> ``torch`` (or ``cpp`` for ops that prefer it when built).

The rules are docs/architecture.md, *Dispatch*.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, Sequence

import torch

from fastalign.kernels._common import interpreting  # noqa: F401  (re-exported: part of this module's API)

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """Whether Triton can be imported, and why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def extension_status() -> tuple[bool, str]:
    """Whether the compiled extension ``fastalign._C`` is loaded or loadable without building."""
    try:
        from fastalign import _ext
    except ImportError as exc:
        return False, f"fastalign._ext is missing ({exc})"
    return _ext.status()


def _device_of(tensors: Iterable[torch.Tensor | None]) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return devices.pop() if devices else torch.device("cpu")


def resolve(
    backend: str,
    tensors: Sequence[torch.Tensor | None],
    *,
    op: str,
    supports: Sequence[str] = ("torch", "triton"),
    prefer_extension: bool = False,
) -> str:
    """Pick the backend for one call of ``op``.

    Args:
        backend: what the caller asked for (one of ``BACKENDS``).
        tensors: the call's tensors; they must share one device.
        op: the op's public name, for error messages.
        supports: the backends ``op`` implements.
        prefer_extension: under ``auto``, use ``cuda``/``cpp`` when the extension is built and the op supports it.

    Returns:
        One of ``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``.

    Raises:
        ValueError: unknown backend, a backend ``op`` does not implement, tensors on several devices.
        RuntimeError: a backend that exists but is unavailable here (no Triton, no CUDA, extension not built).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    device = _device_of(tensors)
    if backend == "auto":
        env = os.environ.get("FASTALIGN_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{op}: FASTALIGN_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        ext = "cuda" if device.type == "cuda" else "cpp"
        if prefer_extension and ext in supports and extension_status()[0]:
            return ext
        if device.type == "cuda" and "triton" in supports and triton_status()[0]:
            return "triton"
        return "torch"
    if backend not in supports:
        raise ValueError(f"{op}: backend={backend!r} is not implemented for this op (it has {tuple(supports)})")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"{op}: backend='triton' requested but {why}")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 "
                "before importing fastalign to run the kernels in Triton's interpreter"
            )
    elif backend in ("cuda", "cpp"):
        want = "cuda" if backend == "cuda" else "cpu"
        if device.type != want:
            raise ValueError(f"{op}: backend={backend!r} needs {want} tensors, got {device.type}")
        ok, why = extension_status()
        if not ok:
            raise RuntimeError(
                f"{op}: backend={backend!r} needs the compiled extension fastalign._C, which is unavailable: {why}. "
                "Build it with `python -m fastalign.ext build` (needs a C++ compiler, ninja, and nvcc for CUDA)."
            )
    return backend
