"""The accuracy rule: every implementation's outputs against a high-precision truth, before any timing.

The max absolute deviation of each output is recorded, and an implementation agrees when, for every output,
``|impl - truth| <= 2 * |torch_same_dtype - truth| + atol`` (the rule in docs/architecture.md, *Testing rules*),
with ``atol`` scaled by the largest ``|truth|`` of that output.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}

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
