"""Argument checks shared by the public ops: one wording, errors that name the op and the argument."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from fastalign.reference.rl import AGG_MODES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, value, *, allow_none: bool = False) -> None:
    """TypeError unless ``value`` is a torch.Tensor (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, torch.Tensor):
        or_none = " or None" if allow_none else ""
        raise TypeError(f"{op}: {name} must be a torch.Tensor{or_none}, got {type(value).__name__}")


def float_tensor(op: str, name: str, value) -> None:
    """TypeError unless ``value`` is an fp16/bf16/fp32/fp64 tensor."""
    tensor(op, name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be fp16/bf16/fp32/fp64, got {value.dtype}")


def number(op: str, name: str, value) -> float:
    """A finite Python number (or a one-element tensor). TypeError for a non-number, ValueError for nan/inf."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


def positive(op: str, name: str, value, *, allow_none: bool = False, above: float = 0.0) -> float | None:
    """A finite number > ``above`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    value = number(op, name, value)
    if value <= above:
        raise ValueError(f"{op}: {name} must be > {above:g}, got {value}")
    return value


def in_unit(op: str, name: str, value) -> float:
    """A finite number in [0, 1]."""
    value = number(op, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must lie in [0, 1], got {value}")
    return value


def positive_int(op: str, name: str, value, *, allow_none: bool = False) -> int | None:
    """A Python int >= 1 (bool refused), or None when allowed. ValueError otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def ppo_clips(op: str, clip_low, clip_high, dual_clip) -> tuple[float, float | None, float | None]:
    """The PPO ratio clips: clip_low > 0, clip_high > 0 or None, dual_clip > 1 or None."""
    return (
        positive(op, "clip_low", clip_low),
        positive(op, "clip_high", clip_high, allow_none=True),
        positive(op, "dual_clip", dual_clip, allow_none=True, above=1.0),
    )


def agg_mode(op: str, agg, norm_len, length: int) -> float:
    """Check an RL aggregation mode and its ``norm_len``; returns the length "seq-mean-token-sum-norm" divides by
    (``norm_len``, or ``length`` = T when None)."""
    if agg not in AGG_MODES:
        raise ValueError(f"{op}: agg must be one of {AGG_MODES}, got {agg!r}")
    norm_len = positive_int(op, "norm_len", norm_len, allow_none=True)
    return float(length if norm_len is None else norm_len)


SYNC_CHECKS_ENV = "FASTALIGN_SYNC_CHECKS"


def deferred_checks(device: torch.device) -> bool:
    """Whether value checks on ``device`` run on the device instead of syncing the host: on CUDA, unless
    ``FASTALIGN_SYNC_CHECKS=1`` asks for eager checks (a host sync each) -- and always while a CUDA graph is being
    captured, where a sync is not allowed."""
    if device.type != "cuda":
        return False
    if os.environ.get(SYNC_CHECKS_ENV, "0") in ("", "0"):
        return True
    return torch.cuda.is_current_stream_capturing()


def check_none(op: str, bad: torch.Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """ValueError("{op}: {message}{details()}") if any element of the bool tensor ``bad`` is True.

    On CPU the check is eager. On CUDA (:func:`deferred_checks`) it does not synchronize the host, so it costs no
    stall and a CUDA graph can capture it: ``torch._assert_async`` fails on the device, and the error surfaces at
    the next synchronization as "CUDA error: device-side assert triggered" naming ``message`` where the driver
    prints it; like torch's own index checks, that ends the CUDA context. ``FASTALIGN_SYNC_CHECKS=1`` restores
    the eager ValueError with its details (one host sync per check) for debugging."""
    if deferred_checks(bad.device):
        torch._assert_async(~bad.any(), f"{op}: {message}")
        return
    if bool(bad.any()):
        raise ValueError(f"{op}: {message}" + (details() if details is not None else ""))
