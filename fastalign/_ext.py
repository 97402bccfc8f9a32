"""Find, build and load the optional compiled extension ``fastalign._C`` (C++ for CPU tensors, CUDA when built
with nvcc). A plain install never compiles anything:

- ``python -m fastalign.ext build`` builds it once (``torch.utils.cpp_extension.load``: a C++ compiler and
  ninja; nvcc and a CUDA build of torch for the CUDA kernels) into a cache directory: ``$FASTALIGN_EXT_DIR``, else
  ``$XDG_CACHE_HOME/fastalign/ext`` (``~/.cache/fastalign/ext``). Each build lives in a folder named by a hash of
  the sources, the torch and Python versions and the CUDA switch, so a stale build is never picked up.
- ``FASTALIGN_BUILD_EXT=1``: build on first use instead (the first op call that could use it pays the build).
- ``FASTALIGN_EXT_CUDA=0``: leave the CUDA kernels out even where nvcc is present.

:func:`status` is cheap after its first call; :func:`load` returns the module (registered as ``fastalign._C``).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import sysconfig
from pathlib import Path

import torch

NAME = "fastalign_C"
CPU_SOURCES = ("bindings.cpp", "rl/rl_cpu.cpp")
CUDA_SOURCES = ("rl/rl_cuda.cu",)
HEADERS = ("common.h", "rl/rl.h")
BUILD_COMMAND = "python -m fastalign.ext build"

_module = None
_error: str | None = None  # why the last build failed
_unavailable: str | None = None  # status() caches a negative answer: it runs on every op call


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: shipped as package data (``fastalign/csrc``), or the repository's top-level ``csrc/``
    in an editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    env = os.environ.get("FASTALIGN_EXT_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastalign" / "ext"


def cuda_buildable() -> tuple[bool, str]:
    """Whether the CUDA kernels can be compiled here: a CUDA build of torch and nvcc (CUDA_HOME)."""
    if os.environ.get("FASTALIGN_EXT_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "FASTALIGN_EXT_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


def _cpu_isa_flags() -> list[str]:
    """``-mavx2 -mfma`` where this x86-64 CPU has both (the RL loss loops are vectorized with them), else nothing.
    The flags enter the build folder's hash, so a machine without AVX2 never loads such a build."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def _flags(with_cuda: bool) -> dict:
    define = ["-DFASTALIGN_WITH_CUDA"] if with_cuda else []
    # -fno-trapping-math: GCC if-converts the selects of the RL loss loops (and so vectorizes them) only when FP
    # comparisons may not trap; results are unchanged (fastalign never enables FP exceptions)
    flags = dict(extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *_cpu_isa_flags(), *define],
                 extra_ldflags=["-fopenmp"])
    if with_cuda:
        flags["extra_cuda_cflags"] = ["-O3", "-lineinfo", *define]
    return flags


def build_dir(with_cuda: bool | None = None) -> Path | None:
    """The cache folder of the build that matches these sources, this torch and this Python (None: no sources)."""
    src = csrc_dir()
    if src is None:
        return None
    if with_cuda is None:
        with_cuda = cuda_buildable()[0]
    digest = hashlib.sha256()
    for rel in (*CPU_SOURCES, *HEADERS, *(CUDA_SOURCES if with_cuda else ())):
        digest.update(rel.encode())
        digest.update((src / rel).read_bytes())
    key = (torch.__version__, sys.version.split()[0], sysconfig.get_platform(), repr(_flags(with_cuda)))
    digest.update(repr(key).encode())
    return cache_dir() / f"{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def _library(folder: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        path = folder / f"{NAME}{suffix}"
        if path.is_file():
            return path
    return None


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _register(module) -> None:
    global _module, _error
    _module, _error = module, None
    sys.modules["fastalign._C"] = module


def build(*, with_cuda: bool | None = None, verbose: bool = False):
    """Compile the extension into the cache (or reuse a matching build) and load it. Raises RuntimeError."""
    global _error, _unavailable
    _unavailable = None
    src = csrc_dir()
    if src is None:
        raise RuntimeError("fastalign._C: the C++/CUDA sources (csrc/) are not part of this install")
    if with_cuda is None:
        with_cuda = cuda_buildable()[0]
    folder = build_dir(with_cuda)
    folder.mkdir(parents=True, exist_ok=True)
    sources = [str(src / rel) for rel in (*CPU_SOURCES, *(CUDA_SOURCES if with_cuda else ()))]
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name=NAME, sources=sources, build_directory=str(folder), verbose=verbose,
            extra_include_paths=[str(src)], **_flags(with_cuda),
        )
    except Exception as exc:  # compiler missing, ninja missing, compile error
        lines = str(exc).strip().splitlines() or [""]
        first_error = next((line for line in lines if "error:" in line), lines[-1])
        _error = f"building it failed ({type(exc).__name__}: {first_error.strip()[:300]})"
        raise RuntimeError(f"fastalign._C: {_error}; rerun `{BUILD_COMMAND} --verbose` for the full log") from exc
    _register(module)
    return module


class Unavailable(RuntimeError):
    """The extension is neither loaded nor cached; ``reason`` says why (the message adds the build command)."""

    def __init__(self, reason: str):
        super().__init__(f"fastalign._C is unavailable: {reason}. Build it with `{BUILD_COMMAND}`.")
        self.reason = reason


def _build_module():
    return build()  # the module-level function: load's argument shadows the name there


def load(build: bool = False):
    """The extension module: already loaded, or a matching build in the cache, or (``build=True`` or
    ``FASTALIGN_BUILD_EXT=1``) a fresh build. Raises RuntimeError with the build command when unavailable."""
    if _module is not None:
        return _module
    folder = build_dir()
    library = _library(folder) if folder is not None else None
    if library is not None:
        try:
            _register(_import(library))
            return _module
        except ImportError as exc:
            if not build and not _truthy("FASTALIGN_BUILD_EXT"):
                raise RuntimeError(f"fastalign._C: the cached build {library} does not load ({exc}); rebuild it "
                                   f"with `{BUILD_COMMAND}`") from exc
    if build or (_truthy("FASTALIGN_BUILD_EXT") and _error is None):
        return _build_module()
    reason = _error or ("the C++/CUDA sources (csrc/) are not part of this install" if folder is None
                        else f"it is not built (no {NAME} in {folder})")
    raise Unavailable(reason)


def status() -> tuple[bool, str]:
    """(available, why): loaded, or loadable from the cache without compiling (or built now when
    ``FASTALIGN_BUILD_EXT=1``); ``why`` says where it lives, or why it is unavailable."""
    global _unavailable
    if _module is not None:
        return True, f"fastalign._C loaded from {getattr(_module, '__file__', '?')} (CUDA kernels: " \
                     f"{'yes' if _module.with_cuda() else 'no'})"
    if _unavailable is not None:
        return False, _unavailable
    try:
        load(build=False)
    except Unavailable as exc:
        _unavailable = exc.reason
        return False, _unavailable
    except RuntimeError as exc:  # a cached build that does not load, or FASTALIGN_BUILD_EXT=1 and the build failed
        _unavailable = str(exc)
        return False, _unavailable
    return status()
