"""What every Triton launcher needs besides block arithmetic: the device guard, the fp32 dot policy, and the table
of tuned launch configs per card (``kernels/configs/*.json``).

No Triton import here (as ``_common``): this module is read before ``TRITON_INTERPRET`` may be decided.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import os

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIG_ENV = "FASTALIGN_KERNEL_CONFIGS"  # a JSON file (or "0": the built-in defaults only), replacing CONFIG_DIR


def _first_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def on_input_device(launcher):
    """Run ``launcher`` with the device of its first tensor argument current.

    A Triton launch uses ``torch.cuda.current_device()`` and that device's current stream, not the tensors' device:
    with tensors on ``cuda:1`` and ``cuda:0`` current, an unguarded launch runs on the wrong device (an illegal
    address, or a silent read of another device's memory through peer access). Inside ``torch.cuda.device(d)`` the
    launch goes to ``d`` and to the stream the caller made current there (``torch.cuda.stream``), as the CUDA
    extension's ``CUDAGuard`` does. CPU tensors (the interpreter) need no guard.
    """

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = _first_device(args, kwargs)
        if device is None or device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    guarded.guards_device = True
    return guarded


def fp32_dot_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 operands, following ``torch.get_float32_matmul_precision()``:
    "highest" (torch's default) -> "ieee" (FFMA, no tensor cores, exact fp32 products); "high" / "medium" ->
    "tf32" (tensor cores, 10-bit mantissa products with fp32 accumulation; a logsumexp over 150k logits moves by
    ~1e-3), the precision torch's own fp32 matmuls use under those settings. Read at each launch."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_name(device: torch.device) -> str:
    """The key of the config table: ``torch.cuda.get_device_name`` (e.g. "NVIDIA H200"); "cpu" otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@functools.lru_cache(maxsize=None)
def _config_table(source: str) -> dict:
    if source == "0":
        return {}
    paths = [source] if os.path.isfile(source) else sorted(glob.glob(os.path.join(source, "*.json")))
    table: dict = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for device, kernels in data.get("devices", {}).items():
            table.setdefault(device, {}).update(kernels)
    return table


_OVERRIDES: dict[str, dict] = {}


@contextlib.contextmanager
def config_override(configs: dict[str, dict]):
    """Within: :func:`tuned_config` returns ``configs[key]`` for those keys on every device, above the table (how
    the sweep times candidates and the compile check builds them)."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(configs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def tuned_config(device: torch.device, key: str, default: dict) -> dict:
    """``default`` updated with the winner recorded for ``key`` (e.g. "logprobs_fwd/bf16") on this card by
    ``benchmarks/config_sweep.py``; ``default`` itself when the card or the key has no entry. Only the keys of
    ``default`` are taken, so a stale table cannot pass an argument a kernel no longer has."""
    entry = _OVERRIDES.get(key)
    if entry is None:
        entry = _config_table(os.environ.get(CONFIG_ENV, CONFIG_DIR)).get(device_name(device), {}).get(key)
    if not entry:
        return dict(default)
    return {name: entry.get(name, value) for name, value in default.items()}
