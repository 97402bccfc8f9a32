"""Paired CPU timing of the RL losses (forward + backward): fastalign against the eager formula and its
``torch.compile``, interleaved in one process (A B C A B C ...) so that a noisy, shared machine slows all of them
alike; each ratio is the median of the per-round ratios, next to each implementation's median.

    python -m benchmarks.rl_paired [--threads 1] [--rounds 60] [--shapes 64x512,256x1024] [--backends cpp,torch]

Inputs and formulas are those of :mod:`benchmarks.rl` (token-mean, clip 0.2, the PPO input layout, a float mask
with a random response length per row). Peak memory: the largest sum of live CPU allocations during one step,
from the profiler's memory events (the inputs excluded), for fastalign and the best peer. Prints one JSON line per
case and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import fastalign as fa

from .rl import _kl_loss, ppo_formula, rl_inputs, value_formula

OPS = {
    "ppo_policy_loss.fwd_bwd": (ppo_formula, lambda b: lambda lp, old, adv, m: fa.ppo_policy_loss(
        lp, old, adv, m, clip_low=0.2, agg="token-mean", backend=b)[0]),
    "value_loss.fwd_bwd": (value_formula, lambda b: lambda v, old, ret, m: fa.value_loss(
        v, old, ret, m, clip=0.2, agg="token-mean", backend=b)[0]),
    "kl_penalty.fwd_bwd": (_kl_loss, lambda b: lambda lp, ref, _u, m: (
        (fa.kl_penalty(lp, ref, kind="k3", backend=b) * m).sum() / m.sum().clamp(min=1.0))),
}


def _step(fn, x):
    logp = x["logprobs"].detach().clone().requires_grad_()

    def step():
        logp.grad = None
        loss = fn(logp, x["old_logprobs"], x["advantages"], x["mask"])
        loss.backward()
        return loss

    return step


def peak_bytes(step) -> int:
    """Largest sum of live allocations during one call of ``step`` (profiler memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_case(name: str, b: int, t: int, backends: list[str], rounds: int) -> dict:
    formula, fastalign_fn = OPS[name]
    x = rl_inputs(b, t, "cpu")
    impls = {f"fastalign[{k}]": _step(fastalign_fn(k), x) for k in backends}
    impls["eager"] = _step(formula, x)
    impls["compile"] = _step(torch.compile(formula), x)
    for step in impls.values():  # warm-up (compiles)
        for _ in range(3):
            step()
    times = {k: [] for k in impls}
    order = list(impls)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):  # alternate the order: no position bias
            start = time.perf_counter()
            impls[k]()
            times[k].append(time.perf_counter() - start)
    out = {"case": name, "B": b, "T": t, "threads": torch.get_num_threads(), "rounds": rounds,
           "load_avg": os.getloadavg(), "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
           "peak_MiB": {k: peak_bytes(impls[k]) / 2**20 for k in impls}}
    for k in impls:
        if k.startswith("fastalign"):
            for peer in ("eager", "compile"):
                ratios = [p / f for p, f in zip(times[peer], times[k])]
                out.setdefault("ratio", {})[f"{peer}/{k}"] = statistics.median(ratios)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--shapes", default="64x512,256x1024")
    parser.add_argument("--backends", default="cpp,torch")
    parser.add_argument("--ops", default=",".join(OPS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    for name in args.ops.split(","):
        for shape in args.shapes.split(","):
            b, t = (int(v) for v in shape.split("x"))
            row = run_case(name, b, t, backends, args.rounds)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'case':26} {'shape':10} {'impl':18} {'median ms':>9} {'peak MiB':>8}  paired ratios (peer / impl)")
    for row in rows:
        for k, ms in row["median_ms"].items():
            ratios = "  ".join(f"{key.split('/')[0]} {v:.2f}x" for key, v in row.get("ratio", {}).items()
                               if key.endswith("/" + k))
            print(f"{row['case']:26} {row['B']}x{row['T']:<7} {k:18} {ms:9.3f} {row['peak_MiB'][k]:8.2f}  {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
