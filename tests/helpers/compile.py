"""Compile @triton.jit kernels for an sm_90 GPU without a GPU: PTX + cubin through ptxas, about a second each.

Catches what the interpreter does not: tl.dot with K < 16, layout and type errors, unsupported ops. Kernels are
compiled in a subprocess without TRITON_INTERPRET (under the interpreter they are not compilable objects).

    results = compile_in_subprocess([dict(kernel="fastalign.kernels.logprobs:_linear_logprobs_fwd_kernel",
                                          pointers={"h_ptr": "bf16", "b_ptr": None, ...}, constexprs={...},
                                          floats=[...], num_warps=8, num_stages=3), ...])
    -> one dict per job: {"ok": bool, "error": str, "shared": int, "cubin_bytes": int}
"""
import importlib
import json
import os
import subprocess
import sys

SCRIPT = __file__


def compile_sm90(fn, *, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=2):
    """``pointers`` maps each pointer argument to its Triton dtype ("bf16", "fp32", ...) or to None for an absent
    one, which a launch specialises as a constexpr None; the flags a ``triton.heuristics`` wrapper derives (HAS_*)
    are computed from these arguments as a launch computes them. Shapes and strides are typed i32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.jit import JITFunction

    constexprs = dict(constexprs)
    while not isinstance(fn, JITFunction):  # a triton.heuristics wrapper
        args = {**pointers, **constexprs, **{name: 1.0 for name in floats}}
        constexprs.update({flag: rule(args) for flag, rule in getattr(fn, "values", {}).items()})
        fn = fn.fn
    signature = {}
    for name in fn.arg_names:
        if pointers.get(name) is not None:
            signature[name] = "*" + pointers[name]
        elif name in pointers or name in constexprs:
            signature[name] = "constexpr"
            constexprs.setdefault(name, None)
        elif name in floats:
            signature[name] = "fp32"
        else:  # shapes and strides
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _run(jobs):
    out = []
    for job in jobs:
        module, name = job["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        try:
            k = compile_sm90(fn, pointers=job["pointers"], constexprs=job["constexprs"],
                             floats=job.get("floats", ()), num_warps=job.get("num_warps", 4),
                             num_stages=job.get("num_stages", 2))
            out.append(dict(ok=True, error="", shared=k.metadata.shared, cubin_bytes=len(k.asm["cubin"])))
        except Exception as exc:  # reported per job, asserted by the test
            out.append(dict(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:], shared=0, cubin_bytes=0))
    return out


def compile_in_subprocess(jobs, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, SCRIPT], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.stdin.read()))))
