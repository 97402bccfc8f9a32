"""The generation rows of the report: a GRPO rollout + step, HF ``generate`` against vLLM, from the JSON of
``python -m benchmarks.generation`` (schema ``fastalign-generation-bench/1``, kept as
``benchmarks/results/generation/cpu.json``).

``benchmarks/report.py`` hands every results file it is given to :func:`split` first: generation runs come back
separately, the others go on to the kernel report, and :func:`section` renders the generation runs as a markdown
section of BENCHMARKS.md (:func:`rows` is the table alone, for the README).
"""
from __future__ import annotations

SCHEMA = "fastalign-generation-bench/1"


def is_generation_run(run: dict) -> bool:
    return run.get("schema") == SCHEMA


def split(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the kernel benchmark runs, the generation runs), each in the order given."""
    return [r for r in runs if not is_generation_run(r)], [r for r in runs if is_generation_run(r)]


def _f(value, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def rows(run: dict) -> str:
    """The table of one generation run: one row per backend (a missing one with its import error)."""
    lines = ["| backend | generation tok/s | whole step tok/s | generation s (median) | step s (median) "
             "| weight sync ms (median) | engine start s | tokens / step | sampler vs trainer max abs log-prob gap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in run.get("results", []):
        name = {"hf": "HF `generate` (the policy)", "vllm": "vLLM (in-process, colocated)"}.get(r["backend"],
                                                                                              r["backend"])
        if r.get("status") != "ok":
            detail = str(r.get("detail", "")).replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {name} | **{r.get('status')}**: {detail} | | | | | | | |")
            continue
        gap = r.get("sampler_logprob_diff_max")
        lines.append(
            f"| {name} | {_f(r['gen_tokens_per_s'])} | {_f(r['step_tokens_per_s'])} | {_f(r['gen_s_median'], 3)} "
            f"| {_f(r['step_s_median'], 3)} | {_f(r['sync_ms_median'], 1) if r['backend'] != 'hf' else 'none'} "
            f"| {_f(r['engine_start_s'], 1) if r['backend'] != 'hf' else '—'} | {_f(r['tokens_per_step'])} "
            f"| {'—' if gap is None else f'{gap:.1e}'} |")
    return "\n".join(lines) + "\n"


def _describe(run: dict) -> list[str]:
    mach, shape, vers = run.get("machine", {}), run.get("shape", {}), run.get("versions", {})
    load = run.get("load_average") or {}
    env = run.get("environment") or {}
    out = [f"- machine: {mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpu_count')} CPUs, torch "
           f"threads {mach.get('torch_threads')}" + ("; no GPU" if not mach.get("cuda") else f"; {mach.get('card')}"),
           f"- environment: `{env.get('prefix', '?')}` (vLLM {vers.get('vllm', '?')}, torch {vers.get('torch')}, "
           f"transformers {vers.get('transformers')}, python {vers.get('python')})",
           f"- command: `{run.get('command')}` ({run.get('seconds')} s) at commit {run.get('commit')}, {run.get('date')}"]
    if env.get("made_by"):
        out.append(f"- environment made by: `{env['made_by']}`")
    if load:
        out.append(f"- load average (1, 5, 15 min) before: {load.get('before')}, after: {load.get('after')}")
    out.append(f"- shape: {shape.get('model')} (hidden {shape.get('hidden_size')}, {shape.get('layers')} layers, "
               f"{shape.get('num_heads')} heads), {shape.get('prompts')} prompts x G={shape.get('G')}, up to "
               f"{shape.get('max_new_tokens')} new tokens, fp32")
    if run.get("note"):
        out.append(f"- note: {run['note']}")
    return out


def section(runs: list[dict]) -> list[str]:
    """Markdown lines of the generation section (empty without generation runs)."""
    if not runs:
        return []
    L = ["## Generation: a GRPO rollout + step, HF `generate` vs vLLM", "",
         "Each backend runs the trainer's own pieces for a few timed steps after a warm-up: `rollout.collect` "
         "(generation + rewards), the trainer's log-prob forward, group advantages, the actor loss forward + "
         "backward, an AdamW step, then `sync_weights` (vLLM: the new weights streamed into the engine in place; "
         "HF samples from the policy itself, nothing to sync). Tokens/s count generated tokens; the whole step "
         "divides them by generation + scoring + loss + optimizer + sync. Wall clock of the tiny model on the "
         "stated machine: it shows that both paths run and what the sync costs, not what vLLM gains on a GPU "
         "(no GPU number is claimed here).", ""]
    for run in runs:
        L.append(f"### {run.get('machine', {}).get('card', 'CPU')} — {run.get('date')}")
        L.append("")
        L += _describe(run)
        L.append("")
        L.append(rows(run).rstrip())
        L.append("")
    return L
