"""A short launch-config sweep per kernel on a lent GPU; the winners become the card's table in kernels/configs/.

    python -m benchmarks.config_sweep --out-dir $OUT/configs          # on the GPU (benchmarks/gpu_check.sh)
    python -m benchmarks.config_sweep --dry-run --out-dir /tmp/cfg    # no GPU: compile every candidate instead

A handful of candidates per kernel, chosen from the compile table (benchmarks/compile_table.py: no spills, shared
memory that fits). On the GPU each candidate runs the public op at a sweep shape under
``fastalign.kernels._launch.config_override`` -- its outputs checked against the default config's, then timed
(median of CUDA-event timings) -- and the fastest that agrees wins. ``--dry-run`` compiles each candidate for
sm_90a instead (``fastalign.kernels.compiled``, no GPU needed) and keeps the default, recording each candidate's
registers, spills and shared memory: the same JSON shape, with ``"dry_run": true`` and device "dry-run" (a name
no launcher looks up). Written as ``<out-dir>/<card>.json``:

    {"format": 1, "generated_by": "benchmarks/config_sweep.py", "dry_run": false, "machine": {...},
     "devices": {"NVIDIA H200": {"logprobs_fwd/bf16": {"BLOCK_N": 128, ..., "num_stages": 3}, ...}},
     "candidates": {"logprobs_fwd/bf16": [{"config": {...}, "ok": true, "ms": 13.2, "regs": 189, ...}, ...]}}

Copy a GPU run's file into kernels/configs/ to make the launchers use it (``FASTALIGN_KERNEL_CONFIGS`` points
them at another file, "0" at the built-in defaults). This is a tuning tool, so unlike the benchmarks it names
the launchers' config keys.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch

# key -> (compile case of fastalign.kernels.compiled, candidates); the first candidate is the launcher's default.
# 14 in all: each compiles (a few seconds) and runs ~0.3 s, inside gpu_check.sh's sweep deadline.
CANDIDATES: dict[str, tuple[str, list[dict]]] = {
    "logprobs_fwd/bf16": ("logprobs_fwd/bf16", [
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=16),
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4, GROUP_N=16),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4, GROUP_N=16),
        dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=4, GROUP_N=16),
    ]),
    "logprobs_bwd/bf16": ("logprobs_bwd/bf16", [
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4, GROUP_N=8),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=3, GROUP_N=8),
    ]),
    "gae": ("gae", [
        dict(BLOCK_B=2, BLOCK_T=1024, num_warps=4),
        dict(BLOCK_B=1, BLOCK_T=2048, num_warps=4),
        dict(BLOCK_B=1, BLOCK_T=1024, num_warps=2),
        dict(BLOCK_B=4, BLOCK_T=512, num_warps=4),
    ]),
    "rl_loss": ("ppo_loss", [
        dict(BLOCK_T=2048, num_warps=8),
        dict(BLOCK_T=1024, num_warps=4),
        dict(BLOCK_T=512, num_warps=4),
        dict(BLOCK_T=1024, num_warps=8),
    ]),
}
# the sweep shapes: the target head on fewer tokens (a forward in ~15 ms), the RL ops at their target size
SWEEP_SHAPES = dict(n=8192, d=3584, v=151936, b=512, t=2048)
DRY_RUN_DEVICE = "dry-run"


def card_slug(name: str) -> str:
    """"NVIDIA H200" -> "h200": the file name of a card's table."""
    name = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# ------------------------------------------------------------------------------------------------- dry run

def dry_run(keys: list[str], max_candidates: int | None) -> dict:
    """Compile every candidate for sm_90a; the default wins (nothing is timed)."""
    from benchmarks.compile_table import compile_reports_jobs

    jobs, owners = [], []
    for key in keys:
        case, candidates = CANDIDATES[key]
        for cfg in candidates[:max_candidates]:
            jobs.append(dict(case=case, configs={key: cfg}))
            owners.append((key, cfg))
    reports = compile_reports_jobs(jobs)
    table: dict[str, list[dict]] = {key: [] for key in keys}
    for i, (key, cfg) in enumerate(owners):
        mine = [r for r in reports if r["job"] == i and _configured(r, cfg)]
        entry = dict(config=cfg, ms=None, ok=bool(mine) and all(_clean(r) for r in mine))
        if mine:
            r = mine[0]
            entry.update({k: r.get(k) for k in ("regs", "spill_stores", "spill_loads", "smem", "mma",
                                                 "ctas_per_sm", "error") if k in r})
        table[key].append(entry)
    winners = {key: next((e["config"] for e in table[key] if e["ok"]), CANDIDATES[key][1][0]) for key in keys}
    return dict(devices={DRY_RUN_DEVICE: winners}, candidates=table)


def _configured(report: dict, cfg: dict) -> bool:
    """The report of the kernel the candidate configures (its launch config carries every candidate key)."""
    return all(report["config"].get(k) == v for k, v in cfg.items())


def _clean(report: dict) -> bool:
    return ("error" not in report and report["spill_stores"] == report["spill_loads"] == 0
            and report["smem"] <= 227 * 1024)


# --------------------------------------------------------------------------------------------------- the GPU

def _workloads(device: torch.device) -> dict:
    """key -> a zero-argument call of the public op the key's kernel serves, at the sweep shapes."""
    import fastalign as fa

    s = SWEEP_SHAPES
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(s["n"], s["d"], device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(s["v"], s["d"], device=device, generator=g) / math.sqrt(s["d"]) * 3).to(torch.bfloat16)
    labels = torch.randint(0, s["v"], (s["n"],), device=device, generator=g)
    up = torch.randn(s["n"], device=device, generator=g)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    r = torch.randn(s["b"], s["t"], device=device, generator=g)
    v = torch.randn(s["b"], s["t"], device=device, generator=g)
    mask = torch.rand(s["b"], s["t"], device=device, generator=g) > 0.25
    logp = (torch.randn(s["b"], s["t"], device=device, generator=g) * 0.3).requires_grad_()
    old = logp.detach() + torch.randn(s["b"], s["t"], device=device, generator=g) * 0.3

    def fwd():
        return fa.linear_logprobs(h, w, labels, return_entropy=True, backend="triton")

    def bwd():
        out = fa.linear_logprobs(hg, wg, labels, backend="triton").logprobs
        return torch.autograd.grad(out, (hg, wg), up)

    def gae():
        return fa.gae(r, v, mask, gamma=0.99, lam=0.95, backend="triton")

    def ppo():
        loss, _ = fa.ppo_policy_loss(logp, old, r, mask, dual_clip=3.0, backend="triton")
        return (loss, *torch.autograd.grad(loss, logp))

    return {"logprobs_fwd/bf16": fwd, "logprobs_bwd/bf16": bwd, "gae": gae, "rl_loss": ppo}


def _agree(out, ref) -> bool:
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref if isinstance(ref, (tuple, list)) else [ref]
    for a, b in zip(outs, refs):
        if a is None or b is None:
            continue
        a, b = a.float(), b.float()
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-2 * (b.abs().max().item() + 1e-6)):
            return False
    return True


def gpu_sweep(keys: list[str], max_candidates: int | None, deadline: float) -> dict:
    from benchmarks.timing import measure_time
    from fastalign.kernels._launch import config_override

    device = torch.device("cuda")
    work = _workloads(device)
    start = time.monotonic()
    table: dict[str, list[dict]] = {}
    winners: dict[str, dict] = {}
    for key in keys:
        fn = work[key]
        default = CANDIDATES[key][1][0]
        with config_override({key: default}):
            reference = fn()
        table[key] = []
        for cfg in CANDIDATES[key][1][:max_candidates]:
            entry = dict(config=cfg, ms=None, ok=False)
            if time.monotonic() - start > deadline:
                entry["error"] = "skipped: sweep deadline"
                table[key].append(entry)
                continue
            try:
                with config_override({key: cfg}):
                    entry["ok"] = _agree(fn(), reference)
                    if entry["ok"]:
                        entry["ms"] = round(measure_time(fn, device, budget_s=0.3).median_ms, 4)
                    else:
                        entry["error"] = "outputs differ from the default config's"
            except Exception as exc:  # noqa: BLE001 - a failing candidate loses, the sweep goes on
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            table[key].append(entry)
            print(f"  {key:20s} {cfg} -> {entry.get('ms')} ms {entry.get('error', '')}", flush=True)
        timed = [e for e in table[key] if e["ok"] and e["ms"] is not None]
        winners[key] = min(timed, key=lambda e: e["ms"])["config"] if timed else default
    return dict(devices={torch.cuda.get_device_name(device): winners}, candidates=table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="compile the candidates instead of timing them")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels",
                                                          "configs"), help="where <card>.json is written")
    parser.add_argument("--keys", default=",".join(CANDIDATES), help="comma list of " + ", ".join(CANDIDATES))
    parser.add_argument("--max-candidates", type=int, default=None, help="at most this many per key")
    parser.add_argument("--deadline", type=float, default=55.0, help="GPU: seconds of sweeping, then defaults")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k]
    unknown = [k for k in keys if k not in CANDIDATES]
    if unknown:
        parser.error(f"unknown keys {unknown}; known: {list(CANDIDATES)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to compile the candidates instead")
    result = dry_run(keys, args.max_candidates) if args.dry_run else gpu_sweep(keys, args.max_candidates,
                                                                               args.deadline)
    from benchmarks.environment import versions

    card = next(iter(result["devices"]))
    doc = dict(format=1, generated_by="benchmarks/config_sweep.py", dry_run=args.dry_run,
               machine=dict(device=card, versions={k: versions().get(k) for k in ("torch", "triton", "fastalign")},
                            date=time.strftime("%Y-%m-%d")), **result)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{card_slug(card)}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: " + ", ".join(f"{k} -> {v}" for k, v in result["devices"][card].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
