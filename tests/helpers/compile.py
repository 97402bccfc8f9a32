"""Compile the launchers' kernels for sm_90a without a GPU (``fastalign.kernels.compiled``), in a subprocess.

The kernels must be real ``JITFunction``s to compile, so the subprocess runs with ``TRITON_INTERPRET=0`` while the
tests themselves keep the interpreter. One subprocess per call: a test module asks once for all its cases (a
module-scoped fixture) and Triton's on-disk cache makes a second run cheap.

    reports = compile_cases(["logprobs_fwd/bf16", "gae"])   # -> {case: [report per distinct kernel]}
"""
import json
import os
import subprocess
import sys


def compile_cases(names, *, configs=None, timeout=900) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", FASTALIGN_COMPILE_CONFIGS=json.dumps(configs or {}))
    env.pop("FASTALIGN_POISON", None)  # the launchers allocate meta tensors: nothing to poison
    proc = subprocess.run([sys.executable, "-m", "fastalign.kernels.compiled", *names], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-4000:]}")
    reports: dict = {name: [] for name in names}
    for report in json.loads(proc.stdout.strip().splitlines()[-1]):
        reports[report["case"]].append(report)
    return reports
