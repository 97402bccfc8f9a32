"""``python -m benchmarks`` / ``fastalign bench``: run the side-by-side benchmarks, or rebuild the report.

    python -m benchmarks --preset cpu --out bench_out           # run (ops + e2e), write JSON, markdown, PNGs
    python -m benchmarks --preset gpu --out $OUT/bench           # on a lent H100/H200 (benchmarks/gpu_check.sh)
    python -m benchmarks --cases linear_logprobs --n 4096 --d 1024 --v 32000 --dtype bf16
    python -m benchmarks report bench_out/results.json [more.json] --out BENCHMARKS.md

Every case runs every implementation it knows on identical inputs, checks agreement with a high-precision truth
before timing, and reports missing peers with their import error (never a silent skip).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

# 2: implementations timed in interleaved rounds; rows carry time["round_ms"], cases "paired" (median of per-round
#    ratios), "rounds", "interleaved" and "load"; the run carries "load" (start/end load averages, CPUs, threads).
#    The report reads schema 1 too (ratios of medians, no load).
SCHEMA = 2

RUN_EPILOG = "Cases: " + ", ".join(["linear_logprobs", "dpo", "grpo", "gae", "ppo", "value_loss", "kl_penalty",
                                     "dpo_step", "grpo_step", "trl_dpo_step", "trl_grpo_step",
                                     "hf_sft_step"])


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EPILOG)
    p.add_argument("--preset", choices=("ci", "cpu", "gpu"), default=None,
                   help="shape set (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--suite", default="ops,e2e", help="comma list of suites: ops, e2e (default both)")
    p.add_argument("--cases", default=None, help="comma list of cases (overrides --suite); " + RUN_EPILOG)
    p.add_argument("--out", default="bench_out", help="output directory (results.json, results.md, PNGs)")
    p.add_argument("--n", type=int, help="linear_logprobs: tokens N (custom shape; disables the sweep)")
    p.add_argument("--d", type=int, help="hidden size D for linear_logprobs / dpo / grpo")
    p.add_argument("--v", type=int, help="vocabulary V for linear_logprobs / dpo / grpo")
    p.add_argument("--b", type=int, help="batch B for gae / ppo / value_loss / kl_penalty / grpo")
    p.add_argument("--t", type=int, help="time steps / tokens per sequence T for gae / ppo / dpo / grpo")
    p.add_argument("--pairs", type=int, help="dpo: preference pairs")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="dtype of hidden states and weights")
    p.add_argument("--mode", choices=("fwd_bwd", "fwd_bwd_frozen", "fwd", "both", "all"), default=None,
                   help="linear_logprobs modes (both: fwd_bwd and fwd; all: also fwd_bwd_frozen, a frozen weight)")
    p.add_argument("--no-sweep", action="store_true", help="skip the N/V sweep of linear_logprobs")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation")
    p.add_argument("--impl-timeout", type=float, default=None,
                   help="seconds one implementation may take in all (check + timing + memory) before it is cut")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run; cases not started by then are reported as skipped")
    p.add_argument("--no-build-ext", action="store_true", help="do not build the optional C++/CUDA extension")
    p.add_argument("--device", default=None, help="override the preset's device (cpu | cuda)")
    p.add_argument("--timer", choices=("events", "do_bench"), default="events",
                   help="GPU timing: CUDA events with repetitions from a warm call (default), or "
                        "triton.testing.do_bench (fixed 5-call estimate + warm-up: slower for 0.5 s cases)")
    p.add_argument("--quiet", action="store_true")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks report",
                                description="Regenerate BENCHMARKS.md from one or more results.json files and "
                                            "print the headline table for the README.")
    p.add_argument("results", nargs="+", help="results.json files (e.g. a CPU run and a GPU run)")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write ('-' for stdout only)")
    p.add_argument("--plots-dir", default=None,
                   help="where to write the PNGs the report links (default: next to --out, benchmarks/results)")
    p.add_argument("--note", action="append", default=[], help="a line to add under the title (repeatable)")
    p.add_argument("--readme", default=None,
                   help="also rewrite the benchmark section of this README (between its section markers only)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report(_report_parser().parse_args(argv[1:]))
    if argv and argv[0] == "run":
        argv = argv[1:]
    return _run(_run_parser().parse_args(argv), argv)


# ------------------------------------------------------------------------------------------------------- run

def _select(args) -> list[str]:
    from .presets import CASE_KEYS, SUITES

    if args.cases:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
    else:
        names = [c for s in args.suite.split(",") if s.strip() for c in SUITES.get(s.strip(), ())]
        bad = [s for s in args.suite.split(",") if s.strip() and s.strip() not in SUITES]
        if bad:
            raise SystemExit(f"unknown suite(s) {bad}; choose from {sorted(SUITES)}")
    unknown = [n for n in names if n not in CASE_KEYS]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; {RUN_EPILOG}")
    return names


def _specs(args, preset: dict, dtype) -> dict:
    """The preset's specs with command-line shape overrides applied."""
    s = {k: [dict(x) for x in v] if isinstance(v, list) else v for k, v in preset.items()}
    if dtype is not None:
        for key in ("logprobs", "logprobs_sweep", "dpo", "grpo", "e2e_dpo", "e2e_grpo", "e2e_sft"):
            for x in s[key]:
                x["dtype"] = dtype
    if args.n or args.d or args.v:
        base = s["logprobs"][0]
        s["logprobs"] = [dict(base, n=args.n or base["n"], d=args.d or base["d"], v=args.v or base["v"], head=None)]
        s["logprobs_sweep"] = []
    for key in ("dpo", "grpo"):
        if args.d or args.v:
            s[key] = [dict(x, d=args.d or x["d"], v=args.v or x["v"], head=None) for x in s[key]]
    if args.t or args.b:
        for key in ("gae", "ppo", "grpo"):  # value_loss and kl_penalty use the ppo shapes
            s[key] = [dict(s[key][0], t=args.t or s[key][0]["t"], b=args.b or s[key][0]["b"])]
    if args.t or args.pairs:
        s["dpo"] = [dict(s["dpo"][0], t=args.t or s["dpo"][0]["t"], pairs=args.pairs or s["dpo"][0]["pairs"])]
    if args.mode:
        modes = {"both": ("fwd_bwd", "fwd"), "all": ("fwd_bwd", "fwd_bwd_frozen", "fwd")}.get(args.mode, (args.mode,))
        for x in s["logprobs"]:
            x["modes"] = modes
    if args.no_sweep:
        s["logprobs_sweep"] = []
    for x in s["logprobs_sweep"]:
        x["headline"] = False
    return s


def _build_cases(names: list[str], specs: dict, device, compile_peers: bool, compile_logprobs: bool | None = None):
    """Cases in priority order, so that a run deadline cuts the least important ones: the first logprobs shape,
    GAE/PPO, the fused DPO/GRPO losses, the e2e steps, the other logprobs shapes, value/KL losses, the sweep."""
    from . import e2e, linear_losses, logprobs, rl

    lp_compile = compile_peers if compile_logprobs is None else compile_logprobs
    lp = logprobs.cases(specs["logprobs"], device, compile_peers=lp_compile) if "linear_logprobs" in names else []
    first_shape = [c for c in lp if c.params == lp[0].params] if lp else []
    rest_shapes = [c for c in lp if c not in first_shape]
    cases = first_shape
    cases += rl.cases(specs["gae"] if "gae" in names else [], specs["ppo"] if "ppo" in names else [], device,
                      compile_peers=compile_peers)
    cases += linear_losses.cases(specs["dpo"] if "dpo" in names else [], specs["grpo"] if "grpo" in names else [],
                                 device)
    cases += e2e.cases(specs["e2e_dpo"] if "dpo_step" in names else [],
                       specs["e2e_grpo"] if "grpo_step" in names else [], device)
    cases += e2e.integration_cases(specs["e2e_dpo"] if "trl_dpo_step" in names else [],
                                   specs["e2e_grpo"] if "trl_grpo_step" in names else [],
                                   specs["e2e_sft"] if "hf_sft_step" in names else [], device)
    cases += rest_shapes
    cases += rl.cases([], [], device, compile_peers=compile_peers,
                      value_specs=specs["ppo"] if "value_loss" in names else [],
                      kl_specs=specs["ppo"] if "kl_penalty" in names else [])
    if "linear_logprobs" in names:  # the scaling sweep last: under a deadline it is what gets cut
        cases += logprobs.cases(specs["logprobs_sweep"], device, compile_peers=False)
    return cases


def _run(args, argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    import torch

    from . import environment, peers, report
    from .presets import DTYPES, PRESETS
    from .runner import load_average, run_case

    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"preset {preset_name!r} needs CUDA, and no CUDA device is available here; use --preset cpu",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else None
    names = _select(args)
    specs = _specs(args, preset, dtype)
    budget = args.budget if args.budget is not None else preset["budget_s"]
    impl_timeout = args.impl_timeout if args.impl_timeout is not None else preset["impl_timeout_s"]
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))

    ext_status = "not requested"
    if any(n in names for n in ("gae", "ppo")):
        build = preset["build_ext"] and not args.no_build_ext
        log(f"compiled extension: loading{' (building it if needed, ~1 min once)' if build else ''} ...")
        ext_status = peers.ensure_extension(build=build)
    meta = {
        "schema": SCHEMA,
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv),
        "preset": preset_name, "date": environment.now_utc(), "commit": environment.git_commit(),
        "machine": environment.machine(),
        "versions": environment.versions(), "extension": ext_status, "device": str(device),
        "timing_method": ("cpu-wall-clock" if device.type != "cuda" else
                          "triton.testing.do_bench (return_mode='all')" if args.timer == "do_bench" else
                          "CUDA events per call, L2 flushed before each (as triton.testing.do_bench)"),
        "memory_method": ("cuda max_memory_allocated - memory_allocated before the call" if device.type == "cuda"
                          else "sampled process RSS (peak - before), approximate; not comparable to GPU figures"),
        "budget_s_per_impl": budget, "impl_timeout_s": impl_timeout,
        "timing_order": ("one implementation after another (do_bench owns its loop)"
                         if device.type == "cuda" and args.timer == "do_bench" else
                         "interleaved rounds (A B C A B C ...) after one warm-up call each"),
        "load": {"start": load_average(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    log(f"fastalign benchmarks: preset {preset_name}, device {device} ({meta['machine'].get('card')}), "
        f"cases {', '.join(names)}")
    log(f"  versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    log(f"  extension: {ext_status}")
    log(f"  load average (1, 5, 15 min): {meta['load']['start']} on {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}")

    cases = _build_cases(names, specs, device, preset["compile"], preset.get("compile_logprobs"))
    results, skipped = [], []
    for case in cases:
        if args.deadline and time.perf_counter() - t_start > args.deadline:
            skipped.append(f"{case.name} {case.params}")
            results.append({"suite": case.suite, "case": case.name, "params": case.params, "tokens": case.tokens,
                            "headline": case.headline, "rows": [], "skipped": "run deadline reached",
                            "dtype": str(case.dtype).replace("torch.", ""), "device": str(device)})
            log(f"  {case.name} {case.params}: skipped (deadline {args.deadline:.0f} s reached)")
            continue
        log(f"- {case.suite}/{case.name} {case.params}")
        results.append(run_case(case, budget_s=budget, impl_timeout_s=impl_timeout, timer=args.timer, log=log))
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    meta["load"]["end"] = load_average()
    meta["skipped_for_deadline"] = skipped
    data = {**meta, "cases": results}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    plots = report.write_plots([data], out)
    (out / "results.md").write_text(report.render([data], plot_paths=[Path(p).name for p in plots],
                                                  title="fastalign benchmark run",
                                                  sources=[str(out / "results.json")]))
    log("")
    log(report.headline_table([data]))
    log(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in plots)
        + f" in {meta['seconds']} s")
    bad = [f"{c['case']} {r['impl']}" for c in results for r in c.get("rows", [])
           if r.get("agrees") is False and r.get("extra", {}).get("family") == "fastalign"]
    if bad:
        log("WARNING: fastalign disagrees with the truth in: " + "; ".join(bad))
    return 0


# ---------------------------------------------------------------------------------------------------- report

def _report(args) -> int:
    from . import report

    runs = [json.loads(Path(p).read_text()) for p in args.results]
    out = None if args.out == "-" else Path(args.out)
    plots_dir = Path(args.plots_dir) if args.plots_dir else (
        (out.parent if out else Path(".")) / "benchmarks" / "results")
    plots = report.write_plots(runs, plots_dir)
    rel = [os.path.relpath(p, out.parent if out else Path(".")) for p in plots]
    text = report.render(runs, plot_paths=rel, title="Benchmarks", sources=args.results, notes=args.note,
                         generated_by="python -m benchmarks report " + " ".join(
                             shlex.quote(a) for a in [*args.results, "--out", args.out]))
    if out:
        out.write_text(text)
        print(f"wrote {out}" + "".join(f", {p}" for p in plots))
    else:
        print(text)
    print("\nHeadline table (for the README):\n")
    print(report.headline_table(runs))
    if args.readme:
        report.update_readme(args.readme, runs)
        print(f"updated the benchmark section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
