"""``python -m fastalign.env`` (same as ``fastalign env``): which backends are present here, and why not."""
from __future__ import annotations

import importlib


def env_report() -> str:
    import platform

    import torch

    from fastalign import __version__, _backend

    lines = [f"fastalign {__version__} on Python {platform.python_version()}, torch {torch.__version__}"]
    cuda = torch.cuda.is_available()
    lines.append(f"cuda: {torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}")
    ok, why = _backend.triton_status()
    lines.append(f"triton: {'yes' if ok else 'no'} ({why})"
                 + ("; kernels run in the CPU interpreter (TRITON_INTERPRET=1)" if ok and _backend.interpreting() else ""))
    try:
        ok, why = _backend.extension_status()
    except Exception as exc:  # a broken extension must not break `env`
        ok, why = False, f"{type(exc).__name__}: {exc}"
    lines.append(f"extension fastalign._C: {'yes' if ok else 'no'} ({why})")
    lines.append("torch reference: yes (always)")
    for pkg in ("transformers", "peft", "trl", "datasets", "flash_attn"):
        try:
            mod = importlib.import_module(pkg)
            lines.append(f"{pkg}: {getattr(mod, '__version__', 'present')}")
        except ImportError:
            lines.append(f"{pkg}: not installed")
    lines.append(f"default backend on this machine: {'triton' if cuda and _backend.triton_status()[0] else 'torch'}"
                 " (FASTALIGN_BACKEND overrides)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_report())
