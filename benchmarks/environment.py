"""What every run records next to its numbers: package versions, machine facts, the commit measured, the date."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
from typing import Any

import torch


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod, key in [("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                     ("liger_kernel", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy"),
                     ("fastalign", "fastalign"), ("numpy", "numpy")]:
        try:
            m = importlib.import_module(mod)
            out[key] = getattr(m, "__version__", None) or _dist_version(mod)
        except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the run
            out[key] = f"missing ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return out


def _dist_version(mod: str) -> str | None:
    from importlib import metadata

    for name in (mod, mod.replace("_", "-")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "triton_interpret": triton_interpret(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, card_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                    cuda_version=torch.version.cuda)
    else:
        info["card"] = "CPU (no GPU)"
    return info


def git_commit() -> str | None:
    """The commit measured: ``git rev-parse HEAD`` (with ``+dirty`` when fastalign's sources differ from it), or
    ``$FASTALIGN_COMMIT`` for an exported tree without .git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastalign", "kernels", "csrc"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTALIGN_COMMIT")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
