"""The compile table: every kernel as its launcher launches it at the target shapes, compiled for sm_90a without
a GPU (``fastalign.kernels.compiled``), one row per kernel -- registers, spills, shared memory, MMA kind, fences,
atomics, resident CTAs an SM.

    python -m benchmarks.compile_table                   # all cases, a Markdown table on stdout
    python -m benchmarks.compile_table logprobs_fwd/bf16 gae --json out.json

Compiles in a subprocess with ``TRITON_INTERPRET=0`` (the kernels must be real JITFunctions); about a minute on
two cores for every case, seconds once Triton's cache holds them. Estimates drawn from these numbers are
estimates: nothing here runs a kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

COLUMNS = ("case", "kernel", "config", "regs", "spills", "smem KiB", "MMA", "fences", "atomics", "CTAs/SM")


def _compile(env_extra: dict, args: list[str], timeout: int) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0", **env_extra)
    env.pop("FASTALIGN_POISON", None)  # the launchers allocate meta tensors: nothing to poison
    proc = subprocess.run([sys.executable, "-m", "fastalign.kernels.compiled", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_reports(cases: list[str], configs: dict | None = None, timeout: int = 1200) -> list[dict]:
    """Reports of ``fastalign.kernels.compiled`` for ``cases`` (all when empty), compiled in a subprocess."""
    return _compile(dict(FASTALIGN_COMPILE_CONFIGS=json.dumps(configs or {})), list(cases), timeout)


def compile_reports_jobs(jobs: list[dict], timeout: int = 1200) -> list[dict]:
    """Reports of ``{"case": name, "configs": {key: config}}`` jobs, each report tagged with its job's index."""
    return _compile(dict(FASTALIGN_COMPILE_JOBS=json.dumps(jobs)), [], timeout)


def _config(cfg: dict) -> str:
    short = {"BLOCK_N": "N", "BLOCK_V": "V", "BLOCK_D": "D", "BLOCK_B": "B", "BLOCK_T": "T", "BLOCK_P": "P",
             "BLOCK": "", "GROUP_N": "g", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.items())


def row(report: dict) -> list[str]:
    if "error" in report:
        return [report["case"], report["kernel"], _config(report["config"]), "error: " + report["error"][:60],
                "", "", "", "", "", ""]
    spills = report["spill_stores"] + report["spill_loads"]
    atomics = (f"{report['redg']} REDG" if report["redg"] else "") + (f" {report['atomg']} ATOMG"
                                                                       if report["atomg"] else "")
    return [report["case"], report["kernel"].strip("_").removesuffix("_kernel"), _config(report["config"]),
            str(report["regs"]), f"{spills} ({report['stack']} B stack)" if spills or report["stack"] else "0",
            f"{report['smem'] / 1024:.0f}", report["mma"], str(report["membar_gpu"]), atomics.strip() or "-",
            str(report["ctas_per_sm"])]


def markdown(reports: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in reports]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="case names of fastalign.kernels.compiled.CASES (default: all)")
    parser.add_argument("--json", help="also write the raw reports here")
    args = parser.parse_args(argv)
    reports = compile_reports(args.cases)
    print(markdown(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return int(any("error" in r for r in reports))


if __name__ == "__main__":
    sys.exit(main())
