"""The launchers' kernels compiled for a Hopper GPU without one: what a real launch would build, and what it costs.

A check compiles the kernel a launch specializes only when it types the arguments the way the launch does: a
pointer's 16-byte alignment, an integer's divisibility by 16, a stride of 1 (a constexpr). So nothing here builds
signatures by hand. :func:`capture` runs a *launcher* (``fastalign.kernels.<family>``) on meta tensors of the
target shapes with ``JITFunction.run`` replaced by a recorder; :func:`compile_launch` then feeds each recorded
call through Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, as
``JITFunction.run`` does) and compiles it for ``TARGET`` (sm_90a: ``GPUTarget("cuda", 90, 32)``); :func:`inspect`
reads the result: registers, spills and local memory (cuobjdump's resource usage and the SASS's STL / LDL),
shared memory, the MMA kind (``wgmma.mma_async`` in the PTX), GPU-scope fences (``MEMBAR...GPU``) and the atomic
instructions (REDG: relaxed, no return; ATOMG) in the SASS, the loops left after pipelining, reverse scans.

Import this module only with ``TRITON_INTERPRET`` unset or "0" (interpreted kernels are not compilable objects):
the tests run it in a subprocess (tests/helpers/compile.py), ``benchmarks/compile_table.py`` prints its table.

    python -m fastalign.kernels.compiled [case ...]      # JSON reports of the named cases (all by default)
    FASTALIGN_COMPILE_JOBS='[{"case": "gae", "configs": {"gae": {...}}}]' python -m fastalign.kernels.compiled
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise ImportError("fastalign.kernels.compiled needs TRITON_INTERPRET unset or 0: it compiles real kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastalign.kernels import _launch  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200; the NVIDIA backend compiles capability 90 as sm_90a
# the shapes of docs/architecture.md, *Targets*: a Qwen2.5-7B head on 32768 tokens, the RL ops at 512 x 2048
HEAD_SHAPE = dict(n=32768, d=3584, v=151936)
GRID_SHAPE = dict(b=512, t=2048)
# hardware limits of one sm_90 SM, for the occupancy column
SM_REGISTERS, SM_SHARED, BLOCK_SHARED_MAX, SM_THREADS, SM_BLOCKS = 65536, 228 * 1024, 227 * 1024, 2048, 32
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` of a launcher, after its ``triton.heuristics``."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: object

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@contextlib.contextmanager
def recording():
    """Within: every Triton launch is recorded into the yielded list instead of run (no GPU, no compile)."""
    launches: list[Launch] = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real_run


def _specialize(launch: Launch):
    backend = make_backend(TARGET)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)  # what JITFunction.run adds before binding
    kwargs.setdefault("instrumentation_mode", triton.knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return backend, kwargs, bound, specialization, options


def specialization_key(launch: Launch) -> str:
    """What a launch's kernel-cache key is made of: the types / alignment / divisibility of every argument (and
    constexpr values), plus the options. Launches with one key run one compiled kernel."""
    _, _, _, specialization, options = _specialize(launch)
    return repr((launch.name, specialization, sorted(options.items())))


def capture(call: Callable[[], object]) -> list[Launch]:
    """The distinct kernels ``call()`` launches (one per specialization key, in launch order)."""
    with recording() as launches:
        call()
    seen, distinct = set(), []
    for launch in launches:
        key = specialization_key(launch)
        if key not in seen:
            seen.add(key)
            distinct.append(launch)
    return distinct


def signature(launch: Launch) -> dict:
    """How the launch specializes each non-constexpr argument: "*bf16:16" (a pointer aligned to 16 bytes), "i32:16"
    (an int divisible by 16), "i32", "fp32", or "=1" (an int equal to 1, compiled in as a constant)."""
    _, _, _, specialization, _ = _specialize(launch)
    out = {}
    for param, (ty, attr) in zip(launch.fn.params, specialization):
        if param.is_constexpr:
            continue
        if ty == "constexpr":
            if attr is not None:
                out[param.name] = f"={attr}"
            continue
        out[param.name] = ty + (":16" if attr == "D" else "")
    return out


def compile_launch(launch: Launch):
    """Compile one recorded launch for ``TARGET`` exactly as ``JITFunction.run`` / ``_do_compile`` would."""
    backend, kwargs, bound, specialization, options = _specialize(launch)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(launch.fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options=options.__dict__)


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True).stdout


def occupancy(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory (plus the 1 KiB
    the driver reserves per CTA) and threads."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGISTERS // per_warp) // num_warps if per_warp else SM_BLOCKS
    by_smem = SM_SHARED // (smem + 1024)
    return max(0, min(by_regs, by_smem, SM_THREADS // (32 * num_warps), SM_BLOCKS))


def inspect(kernel, num_warps: int) -> dict:
    """The numbers a compiled kernel is judged by (see the module docstring)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("cuobjdump", "-sass", f.name)
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    smem = int(kernel.metadata.shared)
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif re.search(r"\bmma\.sync", ptx):
        mma = "mma.sync"
    elif "tt.dot" in kernel.asm["ttir"]:
        mma = "fma"  # a tl.dot lowered to FFMA
    else:
        mma = "-"
    return dict(
        regs=regs,
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        local=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
        spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\b", sass)),
        smem=smem,
        mma=mma,
        wgmma=ptx.count("wgmma.mma_async"),
        cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        membar_gpu=len(re.findall(r"MEMBAR\.\w*\.?GPU|MEMBAR\.GPU", sass)),
        redg=len(re.findall(r"\bREDG?\b|\bREDG\.", sass)),
        atomg=len(re.findall(r"\bATOMG\b|\bATOMG\.", sass)),
        loops=ttgir.count("scf.for "),
        reverse_scan=bool(re.search(r"tt\.scan[^\n]*reverse = true", kernel.asm["ttir"])),
        num_warps=num_warps,
        ctas_per_sm=occupancy(regs, smem, num_warps),
    )


# ---------------------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    """One launcher call at a target shape; ``configs`` pins launch configs (``_launch.config_override``)."""

    name: str
    call: Callable[[], object]
    note: str = ""
    configs: dict = field(default_factory=dict)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _head(dtype):
    n, d, v = HEAD_SHAPE["n"], HEAD_SHAPE["d"], HEAD_SHAPE["v"]
    return _meta(n, d, dtype=dtype), _meta(v, d, dtype=dtype), _meta(n, dtype=torch.int64), n, v


@contextlib.contextmanager
def _fp32_precision(precision: str | None):
    old = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _logprobs_fwd(dtype, *, entropy=True, bias=False, softcap=None, precision=None, logit_scale=1.0, stats=()):
    def call():
        from fastalign.kernels import logprobs

        h, w, labels, _, v = _head(dtype)
        with _fp32_precision(precision):
            logprobs.linear_logprobs_forward(h, w, labels, _meta(v, dtype=dtype) if bias else None, temperature=0.7,
                                             softcap=softcap, ignore_index=-100, need_entropy=entropy,
                                             logit_scale=logit_scale, stats=stats)
    return call


def _logprobs_bwd(dtype, *, mode="gemm", entropy=True, bias=False, softcap=None, precision=None, logit_scale=1.0):
    def call():
        from fastalign.kernels import logprobs

        h, w, labels, n, v = _head(dtype)
        stat = _meta(n)
        old = os.environ.get("FASTALIGN_LOGPROBS_BWD")
        os.environ["FASTALIGN_LOGPROBS_BWD"] = mode
        try:
            with _fp32_precision(precision):
                logprobs.linear_logprobs_backward(
                    h, w, labels, _meta(v, dtype=dtype) if bias else None, stat, stat if entropy else None, stat,
                    stat if entropy else None, temperature=0.7, softcap=softcap, ignore_index=-100,
                    logit_scale=logit_scale,
                )
        finally:
            if old is None:
                os.environ.pop("FASTALIGN_LOGPROBS_BWD")
            else:
                os.environ["FASTALIGN_LOGPROBS_BWD"] = old
    return call


def _gae(whiten=True):
    def call():
        from fastalign.kernels import rl

        b, t = GRID_SHAPE["b"], GRID_SHAPE["t"]
        rl.gae(_meta(b, t), _meta(b, t, dtype=torch.bfloat16), _meta(b, t, dtype=torch.uint8), gamma=0.99, lam=0.95,
               whiten=whiten)
    return call


def _rl_loss(is_value: bool):
    def call():
        from fastalign.kernels import rl

        b, t = GRID_SHAPE["b"], GRID_SHAPE["t"]
        x = _meta(b, t)
        loss, stats, grad, scale = rl.rl_loss_forward(
            x, x, x, _meta(b, t, dtype=torch.uint8), is_value=is_value, clip_low=0.2,
            clip_high=None if is_value else 0.28, dual_clip=None if is_value else 3.0, agg=0, norm_len=float(t),
            need_grad=True)
        rl.rl_loss_backward(grad, scale, _meta(1), torch.bfloat16)
    return call


def _kl():
    def call():
        from fastalign.kernels import rl

        b, t = GRID_SHAPE["b"], GRID_SHAPE["t"]
        x = _meta(b, t, dtype=torch.bfloat16)
        rl.kl_forward(x, x, kind="k3")
        rl.kl_backward(x, x, _meta(b, t), kind="k3", need_logp=True, need_ref=True)
    return call


bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
CASES = {case.name: case for case in [
    Case("logprobs_fwd/bf16", _logprobs_fwd(bf16), "entropy"),
    Case("logprobs_fwd/bf16-score", _logprobs_fwd(bf16, entropy=False), "no entropy (reference / old-policy scoring)"),
    Case("logprobs_fwd/bf16-all", _logprobs_fwd(bf16, bias=True, softcap=30.0), "bias, softcap, entropy"),
    Case("logprobs_fwd/bf16-stats", _logprobs_fwd(bf16, softcap=30.0, logit_scale=0.5,
                                                  stats=("mean_logits", "is_top1", "log_sum_sq_probs")),
         "entropy, softcap, logit scale and TRL's statistics (what DPOTrainer asks for)"),
    Case("logprobs_fwd/fp16", _logprobs_fwd(fp16), "entropy"),
    Case("logprobs_fwd/fp32-ieee", _logprobs_fwd(fp32, precision="highest"), "matmul precision highest"),
    Case("logprobs_fwd/fp32-tf32", _logprobs_fwd(fp32, precision="high"), "matmul precision high"),
    Case("logprobs_bwd/bf16", _logprobs_bwd(bf16), "gemm mode, logp + entropy grads"),
    Case("logprobs_bwd/bf16-all", _logprobs_bwd(bf16, bias=True, softcap=30.0), "gemm mode, bias, softcap"),
    Case("logprobs_bwd/bf16-scale", _logprobs_bwd(bf16, softcap=30.0, logit_scale=0.5),
         "gemm mode, softcap, logit scale"),
    Case("logprobs_bwd/bf16-atomic", _logprobs_bwd(bf16, mode="atomic", bias=True), "atomic mode, bias"),
    Case("logprobs_bwd/fp32-ieee", _logprobs_bwd(fp32, precision="highest"), "gemm mode"),
    Case("logprobs_bwd/fp32-tf32", _logprobs_bwd(fp32, precision="high"), "gemm mode"),
    Case("logprobs_bwd/fp32-ieee-atomic", _logprobs_bwd(fp32, mode="atomic", precision="highest"), "atomic mode"),
    Case("gae", _gae(), "mask, whiten"),
    Case("ppo_loss", _rl_loss(False), "policy loss, dual clip"),
    Case("value_loss", _rl_loss(True), "clipped value loss"),
    Case("kl", _kl(), "k3"),
]}


def run_case(case: Case, configs: dict | None = None) -> list[dict]:
    """Capture, compile and inspect every distinct kernel of ``case``; one report per kernel (with the launch
    config and the specialized signature), or one with ``error`` when compiling fails."""
    configs = {**case.configs, **(configs or {})}
    with _launch.config_override(configs):
        launches = capture(case.call)
    reports = []
    for launch in launches:
        opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
        blocks = {k: v for k, v in launch.kwargs.items() if k.startswith(("BLOCK_", "GROUP_"))}
        report = dict(case=case.name, kernel=launch.name, note=case.note, config={**blocks, **opts},
                      signature=signature(launch))
        try:
            kernel = compile_launch(launch)
            report.update(inspect(kernel, opts.get("num_warps", 4)))
        except Exception as exc:  # reported, asserted by the tests
            report["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        reports.append(report)
    return reports


def main(argv=None) -> int:
    """Print the JSON reports of the named cases (all by default) with the configs of
    ``$FASTALIGN_COMPILE_CONFIGS``, or of the jobs in ``$FASTALIGN_COMPILE_JOBS`` (a JSON list of
    ``{"case": name, "configs": {key: config}}``; each report then carries its job's index as ``job``)."""
    jobs = json.loads(os.environ.get("FASTALIGN_COMPILE_JOBS", "null") or "null")
    if jobs is None:
        configs = json.loads(os.environ.get("FASTALIGN_COMPILE_CONFIGS", "{}"))
        names = list(argv if argv is not None else sys.argv[1:]) or list(CASES)
        jobs = [dict(case=name, configs=configs) for name in names]
    out = []
    for i, job in enumerate(jobs):
        for report in run_case(CASES[job["case"]], job.get("configs")):
            out.append(dict(report, job=i))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
