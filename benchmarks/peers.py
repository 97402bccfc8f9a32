"""The implementations fastalign is measured against, imported once, each with the reason it is missing.

A peer that cannot be imported is never skipped silently: every case lists it with ``status="missing"`` and the
import error. Functions are looked up on the installed packages (no code from them is copied here).
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from .runner import error_text


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Any | None, str]:
    """Return (object, "") or (None, why). ``name`` is one of the keys below."""
    try:
        return _LOADERS[name](), ""
    except Exception as exc:  # noqa: BLE001 - ImportError, or a peer that breaks on import
        return None, error_text(exc)


def _fastalign():
    import fastalign

    return fastalign


def _trl_selective_log_softmax():
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax


def _trl_chunked():
    """TRL's log-prob-from-hidden-states path: ``ChunkedLogProbFunction`` with the chunk size its trainers use."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return ChunkedLogProbFunction, chunk


def _liger_flce():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def _liger_dpo():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss


def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _trl_trainers():
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    return DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer


_LOADERS = {
    "fastalign": _fastalign,
    "trl.selective_log_softmax": _trl_selective_log_softmax,
    "trl.chunked": _trl_chunked,
    "liger.flce": _liger_flce,
    "liger.dpo": _liger_dpo,
    "liger.grpo": _liger_grpo,
    "cce": _cce,
    "trl.trainers": _trl_trainers,
}


def fastalign_op(name: str) -> tuple[Any | None, str]:
    """A public fastalign op, or why it is absent (ops are added by separate issues)."""
    fa, why = load("fastalign")
    if fa is None:
        return None, why
    fn = getattr(fa, name, None)
    if fn is None:
        return None, f"fastalign.{name} is not implemented in this checkout"
    return fn, ""


def fastalign_backends(device_type: str, *, op_family: str) -> list[tuple[str, str]]:
    """(backend, why-unavailable or "") for every backend of ``op_family`` ("logprobs" | "rl") on this device."""
    from fastalign import _backend

    out = []
    ok, why = _backend.triton_status()
    if ok and device_type != "cuda" and not _backend.interpreting():
        ok, why = False, "needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    out.append(("torch", ""))
    out.append(("triton", "" if ok else why))
    if op_family == "rl":
        ext = "cuda" if device_type == "cuda" else "cpp"
        ok, why = _backend.extension_status()
        out.append((ext, "" if ok else why))
    return out


def ensure_extension(build: bool) -> str:
    """Load (building if asked and possible) the optional compiled extension; returns a one-line status."""
    try:
        from fastalign import _ext
    except ImportError as exc:
        return f"fastalign._ext missing ({exc})"
    try:
        ok, why = _ext.status()
        if not ok and build and hasattr(_ext, "load"):
            _ext.load(build=True)  # JIT build into fastalign's cache (~1 min the first time), then reused
            ok, why = _ext.status()
        return f"{'loaded' if ok else 'unavailable'}: {why}"
    except Exception as exc:  # noqa: BLE001 - a failed build is reported, never fatal
        return f"build/load failed: {error_text(exc)}"
