"""Argument checks shared by the public ops: one wording, errors that name the op and the argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
