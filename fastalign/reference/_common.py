"""What every reference (and the ops' dispatch) agrees on: the dtype the math runs in."""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: half-precision inputs are upcast, never computed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
