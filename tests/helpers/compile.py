"""Compile the launchers' kernels for sm_90a without a GPU (``fastalign.kernels.compiled``), in a subprocess.

The kernels must be real ``JITFunction``s to compile, so the subprocess runs with ``TRITON_INTERPRET=0`` while the
tests themselves keep the interpreter. One subprocess per call: a test module asks once for all its cases (a
module-scoped fixture) and Triton's on-disk cache makes a second run cheap.

    reports = compile_cases(["logprobs_fwd/bf16", "gae"])   # -> {case: [report per distinct kernel]}
"""
from fastalign.benchmarks.compile_table import compile_reports


def compile_cases(names, *, configs=None, timeout=1200) -> dict:
    reports: dict = {name: [] for name in names}
    for report in compile_reports(list(names), configs, timeout):
        reports[report["case"]].append(report)
    return reports
