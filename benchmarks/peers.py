"""The implementations fastalign is measured against, imported once, each with the reason it is missing.

A peer that cannot be imported is never skipped silently: every case lists it with ``status="missing"`` and the
import error. Functions are looked up on the installed packages (no code from them is copied here). fastalign
itself is reached only through its public entry points: the ops, ``fastalign.reference``, the trainer's loss
functions and ``python -m fastalign.ext``.
"""
from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

from .environment import triton_interpret
from .runner import error_text


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Any | None, str]:
    """Return (object, "") or (None, why). ``name`` is one of the keys below."""
    try:
        return _LOADERS[name](), ""
    except Exception as exc:  # noqa: BLE001 - ImportError, or a peer that breaks on import
        return None, error_text(exc)


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
    "trl.selective_log_softmax": _trl_selective_log_softmax,
    "trl.chunked": _trl_chunked,
    "liger.flce": _liger_flce,
    "liger.dpo": _liger_dpo,
    "liger.grpo": _liger_grpo,
    "cce": _cce,
    "trl.trainers": _trl_trainers,
}


def fastalign_backends(device_type: str, *, op_family: str) -> list[str]:
    """The backends fastalign's ops of ``op_family`` ("logprobs" | "rl") offer on this device type: torch and
    triton, and for the RL ops the compiled extension (cuda for CUDA tensors, cpp for CPU tensors).

    Whether one is usable here is the op's own answer: a row asks for its backend explicitly, and the runner reports
    the dispatcher's refusal (not implemented for that op, Triton or the extension unavailable) as missing, with
    the op's message (:func:`benchmarks.runner.backend_refused`)."""
    backends = ["torch", "triton"]
    if op_family == "rl":
        backends.append("cuda" if device_type == "cuda" else "cpp")
    return backends


def backend_label(backend: str, device_type: str) -> str:
    """Row name of one fastalign backend; Triton on CPU runs in its interpreter (``TRITON_INTERPRET=1``)."""
    interpreted = backend == "triton" and device_type != "cuda" and triton_interpret()
    return f"fastalign[{backend}]" + (" (interpreter)" if interpreted else "")


def ensure_extension(build: bool) -> str:
    """Load (building if asked) the optional compiled extension through ``python -m fastalign.ext``'s entry point;
    returns a one-line status: ``loaded: ...``, ``unavailable: ...`` or ``build/load failed: ...``."""
    try:
        from fastalign import ext
    except ImportError as exc:
        return f"fastalign.ext missing ({exc})"
    try:
        if build:  # JIT build into fastalign's cache (~1 min the first time), then reused
            rc, text = _quiet_call(ext.main, ["build"])
            if rc != 0:
                return f"build/load failed: {text.strip().splitlines()[-1] if text.strip() else f'exit {rc}'}"
        rc, text = _quiet_call(ext.main, ["status"])
    except Exception as exc:  # noqa: BLE001 - a failed build is reported, never fatal
        return f"build/load failed: {error_text(exc)}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    why = first.split(": ", 2)[-1]  # "fastalign._C: available: WHY"
    return f"{'loaded' if rc == 0 else 'unavailable'}: {why}"


def _quiet_call(main, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    return rc, out.getvalue()
