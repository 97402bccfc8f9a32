"""What both integrations do the same way: compute in the autocast dtype, as TRL's fused head and autocast do."""
from __future__ import annotations

import torch


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a head computes in: autocast's when autocast is on for the tensor's device, else the tensor's."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t.to(dtype) if t is not None else None
