"""Markdown report, headline table, target check and scaling plots, all built from results.json files.

Nothing here measures: BENCHMARKS.md is a pure function of the JSON it is given, so it is regenerated, never
edited by hand. Each run keeps its card, date, versions and command next to its numbers.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from . import report_generation  # generation runs (benchmarks/generation.py) are rendered by their own module

GPU_DISCLAIMER = ("**CPU run — these timings are not the GPU targets.** The GPU targets in docs/architecture.md "
                  "(*Targets*) are for one H100/H200 in bf16 at large shapes; CPU wall-clock numbers at tiny shapes "
                  "only show that every implementation runs and agrees, and how the code scales on this machine; on a "
                  "shared 2-core machine they are also noisy.")


# ------------------------------------------------------------------------------------------------- formatting

def _ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v * 1000:.1f} µs" if v < 0.01 else f"{v:.3f}"


def _mem(b, method: str | None = None) -> str:
    if b is None:
        return "n/a"
    s = f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    return s + ("*" if method and method.startswith("cpu") else "")


def _span(t: dict, lo: str, hi: str) -> str:
    return f"{_ms(t[lo])}–{_ms(t[hi])}" if t.get(lo) is not None else "—"


def _rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _shape(params: dict) -> str:
    skip = {"dtype", "head", "sweep", "model"}
    s = " ".join(f"{k}={v}" for k, v in params.items() if k not in skip)
    extra = [params[k] for k in ("model", "head") if params.get(k)]
    return s + (f" ({', '.join(extra)})" if extra else "") + f" {params.get('dtype', '')}".rstrip()


def _card(run: dict) -> str:
    return run.get("machine", {}).get("card", "?")


def _is_cpu(run: dict) -> bool:
    return not run.get("machine", {}).get("cuda", False)


def slug(run: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{_card(run)}-{run.get('preset', '')}".lower()).strip("-")


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("time")]


def _best(rows, pred):
    cands = [r for r in _ok(rows) if pred(r)]
    return min(cands, key=lambda r: r["time"]["median_ms"]) if cands else None


def _fam(r) -> str:
    return r.get("extra", {}).get("family", "")


def _is_fa(r) -> bool:
    """A fastalign row that is fastalign's own path (not the "fused ops off" reference rows of the e2e cases)."""
    return _fam(r) == "fastalign" and "fused ops off" not in r["impl"]


def _is_peer(r) -> bool:
    return _fam(r) not in ("fastalign", "floor")


def ratio(case: dict, fa: dict, other: dict) -> tuple[float | None, str]:
    """(other / fastalign time, how): the median of per-round paired ratios when the case was timed in
    interleaved rounds (schema 2), else the ratio of the two medians (schema 1 runs)."""
    for p in case.get("paired") or ():
        if p["fastalign"] == fa["impl"] and p["other"] == other["impl"]:
            return p["median"], "paired"
    if fa.get("time") and other.get("time") and fa["time"].get("median_ms"):
        return other["time"]["median_ms"] / fa["time"]["median_ms"], "medians"
    return None, ""


def toughest_peer(case: dict, fa: dict | None) -> tuple[dict | None, float | None, str]:
    """The other implementation closest to (or ahead of) fastalign: the smallest other / fastalign ratio."""
    peers = [r for r in _ok(case.get("rows", [])) if _is_peer(r)]
    if not fa or not peers:
        return (_best(case.get("rows", []), _is_peer) if peers else None), None, ""
    scored = [(ratio(case, fa, p), p) for p in peers]
    scored = [((v, how), p) for (v, how), p in scored if v is not None]
    if not scored:
        return None, None, ""
    (v, how), p = min(scored, key=lambda x: x[0][0])
    return p, v, how


def _load(x) -> str:
    """'1.23' from a (1, 5, 15 minute) load-average triple: the 1-minute figure."""
    return f"{x[0]:.2f}" if isinstance(x, (list, tuple)) and x else "—"


def run_load_line(run: dict) -> str | None:
    """One line on the machine's load during ``run`` (schema 2), or None for runs that did not record it."""
    ld = run.get("load")
    if not ld:
        return None
    cpus = ld.get("cpu_count") or run.get("machine", {}).get("cpu_count")
    threads = ld.get("torch_threads") or run.get("machine", {}).get("torch_threads")
    case_loads = [c["load"][k][0] for c in run.get("cases", []) for k in ("start", "end")
                  if (c.get("load") or {}).get(k)]
    span = f"; per case {min(case_loads):.2f}–{max(case_loads):.2f}" if case_loads else ""
    return (f"load average (1 min) {_load(ld.get('start'))} at the start, {_load(ld.get('end'))} at the end{span}, "
            f"on {cpus} CPUs, torch threads {threads}" + (
                f" — a load above the CPU count means other processes competed for the cores" if case_loads
                and cpus and max(case_loads) > cpus else ""))


# -------------------------------------------------------------------------------------------------- headline

def headline_rows(run: dict) -> list[dict]:
    out = []
    for c in run.get("cases", []):
        if not c.get("headline", True):
            continue
        if c.get("skipped"):
            out.append({"case": c["case"], "shape": _shape(c.get("params", {})), "fa": None, "peer": None,
                        "floor": None, "checked": False, "skipped": c["skipped"], "ratio": None, "how": ""})
            continue
        rows = c.get("rows", [])
        fa = _best(rows, _is_fa)
        peer, r, how = toughest_peer(c, fa)
        floor = (c.get("floor") or {}).get("ms")
        out.append({"case": c["case"], "shape": _shape(c.get("params", {})), "fa": fa, "peer": peer,
                    "floor": floor, "checked": c.get("checked", True), "ratio": r, "how": how,
                    "load": (c.get("load") or {}).get("start")})
    return out


RATIO_NOTE = ("other / fastalign: the median over interleaved timing rounds of (the other's time / fastalign's time "
              "in the same round); > 1 means fastalign is faster. \"best other\" is the implementation with the "
              "lowest such ratio (the closest to or ahead of fastalign), not necessarily the lowest median. Ratios "
              "marked (m) come from a run that timed implementations one after another: ratio of the medians.")


def headline_table(runs: list[dict], *, header: bool = True) -> str:
    runs, lines = report_generation.split(runs)[0], []
    if not runs:
        return ""
    for run in runs:
        if header:
            lines.append(f"Card: {_card(run)} · {run.get('date')} · preset `{run.get('preset')}` · "
                         f"torch {run.get('versions', {}).get('torch')}")
            load = run_load_line(run)
            if load:
                lines.append("")
                lines.append(f"Machine load: {load}.")
            if _is_cpu(run):
                lines.append("")
                lines.append(GPU_DISCLAIMER)
            lines.append("")
        lines.append("| case | shape | fastalign ms | fastalign peak | best other | its ms | its peak | "
                     "other / fastalign | floor ms |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for h in headline_rows(run):
            fa, peer = h["fa"], h["peer"]
            if h.get("skipped"):
                lines.append(f"| {h['case']} | {h['shape']} | not run: {h['skipped']} | | | | | | |")
                continue
            ratio_s = (f"{h['ratio']:.2f}x" + (" (m)" if h["how"] == "medians" else "")) if h["ratio"] else "—"
            lines.append(
                f"| {h['case']} | {h['shape']} | "
                f"{_ms(fa['time']['median_ms']) if fa else 'missing'}"
                f"{'' if not fa or fa.get('agrees') is not False else ' (DISAGREES)'} | "
                f"{_mem(fa['memory']['peak_above_inputs_bytes'], fa['memory']['method']) if fa and fa.get('memory') else '—'} | "
                f"{peer['impl'] if peer else '—'} | {_ms(peer['time']['median_ms']) if peer else '—'} | "
                f"{_mem(peer['memory']['peak_above_inputs_bytes'], peer['memory']['method']) if peer and peer.get('memory') else '—'} | "
                f"{ratio_s} | {_ms(h['floor'])} |")
        lines.append("")
    lines.append(RATIO_NOTE)
    if any(_is_cpu(r) for r in runs):
        lines.append("")
        lines.append("\\* CPU memory: sampled process RSS above the level before the call (approximate).")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- targets

def _find(run, case, **params):
    for c in run.get("cases", []):
        if c["case"] == case and all(c.get("params", {}).get(k) == v for k, v in params.items()):
            return c
    return None


def _row(c, pred):
    return _best(c.get("rows", []), pred) if c else None


def targets(run: dict) -> list[tuple[str, str, str]]:
    """(target, status, evidence) for the targets in docs/architecture.md (*Targets*) and the issues, judged on
    this run."""
    out = []
    gpu = not _is_cpu(run)
    fa_pred = lambda r: _fam(r) == "fastalign" and "fused ops off" not in r["impl"]  # noqa: E731

    def t(r):
        return r["time"]["median_ms"] if r else None

    def m(r):
        return r["memory"]["peak_above_inputs_bytes"] if r and r.get("memory") else None

    def add(name, cond, evidence, need_gpu=True):
        if need_gpu and not gpu:
            out.append((name, "open", "GPU target; this run is on CPU"))
        elif cond is None:
            out.append((name, "open", evidence or "not measured in this run"))
        else:
            out.append((name, "met" if cond else "missed", evidence))

    c = _find(run, "linear_logprobs.fwd_bwd", N=32768, D=3584, V=151936)
    fa, trl = _row(c, fa_pred), _row(c, lambda r: r["impl"].startswith("TRL chunked"))
    cce = _row(c, lambda r: r["impl"].startswith("CCE (default"))
    add("linear_logprobs fwd+bwd (32768x3584x151936 bf16) <= TRL chunked time, <= 1.5 GiB",
        (t(fa) <= t(trl) and m(fa) <= 1.5 * 2**30) if fa and trl else None,
        f"fastalign {_ms(t(fa))} ms / {_mem(m(fa))}; TRL chunked {_ms(t(trl))} ms" if fa and trl else "")
    add("linear_logprobs fwd+bwd: faster than CCE default (approximate grads) with exact grads",
        (t(fa) < t(cce)) if fa and cce else None,
        f"fastalign {_ms(t(fa))} ms; CCE {_ms(t(cce))} ms" if fa and cce else "")
    c = _find(run, "linear_logprobs.fwd", N=32768, D=3584, V=151936)
    fa, floor = _row(c, fa_pred), (c or {}).get("floor") or {}
    add("linear_logprobs forward-only within 1.15x of one GEMM",
        (t(fa) <= 1.15 * floor["ms"]) if fa and floor.get("ms") else None,
        f"fastalign {_ms(t(fa))} ms; GEMM {_ms(floor.get('ms'))} ms" if fa and floor.get("ms") else "")
    c = _find(run, "gae", B=512, T=2048)
    fa, loop = _row(c, fa_pred), _row(c, lambda r: _fam(r) == "python-loop")
    add("GAE 512x2048 < 20 us and >= 5000x the Python loop",
        (t(fa) < 0.020 and t(loop) / t(fa) >= 5000) if fa and loop else None,
        f"fastalign {_ms(t(fa))}; loop {_ms(t(loop))} ms" if fa and loop else "")
    c = _find(run, "ppo_policy_loss.fwd_bwd", B=512, T=2048)
    fa, comp = _row(c, fa_pred), _row(c, lambda r: _fam(r) == "compile")
    floor = (c or {}).get("floor") or {}
    add("PPO loss fwd+bwd 512x2048 within 2x of bytes floor and ahead of torch.compile",
        (t(fa) <= 2 * floor["ms"] and t(fa) < t(comp)) if fa and comp and floor.get("ms") else None,
        f"fastalign {_ms(t(fa))}; floor {_ms(floor.get('ms'))}; compile {_ms(t(comp))}" if fa and comp else "")
    for case, peer_prefix in (("dpo_loss.fused_from_hidden", "Liger"), ("grpo_loss.fused_from_hidden", "Liger")):
        c = _find(run, case, V=151936)
        fa = _row(c, lambda r: _fam(r) == "fastalign" and "(fused)" in r["impl"])
        unf = _row(c, lambda r: _fam(r) == "fastalign" and "(fused)" not in r["impl"])
        lig = _row(c, lambda r: r["impl"].startswith(peer_prefix))
        trl = _row(c, lambda r: r["impl"].startswith("TRL"))
        ok = None
        if fa and lig and trl:
            ok = t(fa) < t(lig) and t(fa) < t(trl) and m(fa) <= 1.5 * 2**30 and (not unf or t(fa) <= t(unf))
        add(f"{case}: faster than Liger and TRL, <= 1.5 GiB, fused no slower than unfused", ok,
            f"fastalign {_ms(t(fa))} ms / {_mem(m(fa))}; Liger {_ms(t(lig))}; TRL {_ms(t(trl))}" if ok is not None
            else "")
    for case in ("dpo_step", "grpo_step"):
        c = _find(run, case)
        fa = _row(c, lambda r: "fused ops on" in r["impl"])
        trl = _row(c, lambda r: _fam(r) == "trl")
        add(f"e2e {case}: <= half TRL's peak memory and faster than TRL",
            (m(fa) <= 0.5 * m(trl) and t(fa) < t(trl)) if fa and trl and m(fa) is not None and m(trl) else None,
            f"fastalign {_ms(t(fa))} ms / {_mem(m(fa))}; TRL {_ms(t(trl))} ms / {_mem(m(trl))}" if fa and trl else "")
    # the one CPU target (issue 3): the C++ GAE >= 50x the Python loop
    if not gpu:
        gae_cases = [c for c in run.get("cases", []) if c["case"] == "gae" and c.get("rows")]
        c = max(gae_cases, key=lambda c: c.get("tokens") or 0) if gae_cases else None
        cpp = _row(c, lambda r: r["impl"].startswith("fastalign[cpp]"))
        loop = _row(c, lambda r: _fam(r) == "python-loop")
        add("CPU: C++ GAE >= 50x the Python loop" + (f" ({_shape(c['params'])})" if c else ""),
            (t(loop) / t(cpp) >= 50) if cpp and loop else None,
            f"C++ {_ms(t(cpp))} ms; loop {_ms(t(loop))} ms ({t(loop) / t(cpp):.0f}x)" if cpp and loop else
            "the C++ extension did not run here", need_gpu=False)
    return out


# ------------------------------------------------------------------------------- issue #11 targets (any run)

# slack of the memory comparison for sampled CPU RSS: pages the allocator kept make small results read as 0
CPU_MEM_SLACK = 2**20
# (case, allowed fastalign / floor, what the floor is); the frozen case is judged when a run has it
FLOOR_TARGETS = (("linear_logprobs.fwd", 1.2, "1 GEMM"), ("linear_logprobs.fwd_bwd", 1.25, "3 GEMMs"),
                 ("linear_logprobs.fwd_bwd_frozen", 1.25, "2 GEMMs"))
STEP_TARGET = 1.1  # the e2e DPO/GRPO steps: at least this many times faster than TRL's and plain PyTorch's
# a faster peer's memory is taken as the reason it is faster only when its peak is at least this many times
# fastalign's (a few percent of sampled RSS is noise, not a trade)
MEMORY_TRADE_FACTOR = 1.5
# the op-level case of each e2e step's fused head, named when the step misses its target
STEP_HEAD_CASE = {"dpo_step": "dpo_loss.fused_from_hidden", "grpo_step": "grpo_loss.fused_from_hidden"}


def _peak(r):
    return (r.get("memory") or {}).get("peak_above_inputs_bytes") if r else None


def head_plan(r: dict | None) -> str:
    """The head's chosen path and chunk sizes (``extra["head_plan"]``, a dict) as one short string; '' if none."""
    plan = (r or {}).get("extra", {}).get("head_plan")
    if not plan:
        return ""
    if isinstance(plan, dict):
        return ", ".join(f"{k}={v}" for k, v in plan.items())
    return str(plan)


def _ratio_text(v: float | None, how: str) -> str:
    return "—" if v is None else f"{v:.2f}x" + (" (ratio of medians)" if how == "medians" else "")


def case_target(case: dict) -> tuple[str, str]:
    """Issue #11's per-case target on one case: fastalign at least as fast as every other implementation (paired
    ratio >= 1.0) with no more peak memory; a peer that is faster while using more memory than fastalign is named
    as such and does not make a gap. Returns (status, evidence), status "met" | "gap" | "not measured"."""
    rows = case.get("rows", [])
    fa = _best(rows, _is_fa)
    peers = [r for r in _ok(rows) if _is_peer(r)]
    if not fa:
        return "not measured", "no fastalign row ran"
    if not peers:
        return "not measured", "no other implementation ran"
    slack = CPU_MEM_SLACK if (fa.get("memory") or {}).get("method", "").startswith("cpu") else 0
    fm = _peak(fa)
    parts, causes, trades = [], [], []
    gap = False
    for p in peers:
        v, how = ratio(case, fa, p)
        pm = _peak(p)
        parts.append(f"{p['impl']} {_ratio_text(v, how)}")
        more_mem = fm is not None and pm is not None and fm > pm + slack
        if v is not None and v < 1.0:
            if fm is not None and pm is not None and pm > fm + slack and pm >= MEMORY_TRADE_FACTOR * fm:
                trades.append(f"{p['impl']} is ahead (other / fastalign {v:.2f}x) using more peak memory "
                              f"({_mem(pm)} vs "
                              f"fastalign's {_mem(fm)}): its memory is what it trades for speed")
            else:
                gap = True
                causes.append(f"behind {p['impl']} (other / fastalign {v:.2f}x)")
        if more_mem:
            gap = True
            causes.append(f"more peak memory than {p['impl']} ({_mem(fm)} vs {_mem(pm)})")
    ev = f"{fa['impl']} vs " + "; ".join(parts)
    if causes:
        ev += ". Gap: " + "; ".join(causes)
        wrapped = _wrapped_trainer_cause(case, fa, peers)
        if wrapped:
            ev += f". Cause: {wrapped}"
    if trades:
        ev += ". " + "; ".join(trades)
    plan = head_plan(fa)
    if plan:
        ev += f". Head plan: {plan}"
    return ("gap" if gap else "met"), ev


def _wrapped_trainer_cause(case: dict, fa: dict, peers: list[dict]) -> str:
    """Where the fastalign row is another trainer's own step with fastalign's head swapped in (the integration
    cases, e.g. ``trl_dpo_step``): how that trainer's default step compares with plain PyTorch in the same run, since
    fastalign replaces only the head inside it. '' when the case has no such pair of rows."""
    trainer = next((p for p in peers if _fam(p) == "trl"), None)
    plain = next((p for p in peers if _fam(p) == "naive"), None)
    if trainer is None or plain is None or not (plain.get("time") or {}).get("median_ms"):
        return ""
    own = trainer["time"]["median_ms"] / plain["time"]["median_ms"]
    gain, how = ratio(case, fa, trainer)
    return (f"the row is {trainer['impl'].split(' (')[0].replace(' default', '')}'s own step with fastalign's head; "
            f"its default step takes {own:.2f}x plain PyTorch's time here (medians) and fastalign's head makes it "
            f"{_ratio_text(gain, how)} faster: the rest is the trainer's step outside the head")


def _floor_ms(case: dict) -> float | None:
    f = case.get("floor") or {}
    return f.get("median_ms") or f.get("ms")


def issue11_targets(run: dict) -> list[tuple[str, str, str]]:
    """(target, status, evidence) of issue #11's targets, judged on ``run`` alone (any device): every headline case
    against every peer; linear_logprobs against its GEMM floor of the same run; the e2e DPO/GRPO steps >= 1.1x TRL
    and plain PyTorch. status: "met" | "gap" | "not measured"."""
    out = []
    cases = [c for c in run.get("cases", []) if c.get("headline", True) and not c.get("skipped")]
    for c in cases:
        status, ev = case_target(c)
        out.append((f"{c['case']} ({_shape(c.get('params', {}))}): fastalign >= 1.0x every other implementation, "
                    "no more peak memory", status, ev))
    for name, limit, what in FLOOR_TARGETS:
        found = [c for c in cases if c["case"] == name]
        if not found:
            out.append((f"{name} within {limit}x of the {what} floor", "not measured",
                        "no such case in this run" + (" (added with the frozen-weight head)" if "frozen" in name
                                                      else "")))
        for c in found:
            fa = _best(c.get("rows", []), _is_fa)
            floor = _floor_ms(c)
            label = f"{name} ({_shape(c.get('params', {}))}) within {limit}x of the {what} floor"
            if not fa or not floor:
                out.append((label, "not measured", "no fastalign row" if not fa else "no floor measured"))
                continue
            paired = ((c.get("floor") or {}).get("paired") or {}).get(fa["impl"])
            if paired:  # the floor ran in the rounds: the median of fastalign / floor per round
                x = paired["median"]
                how = (f"median of {paired['rounds']} paired per-round ratios, p20-p80 {paired['p20']:.2f}-"
                       f"{paired['p80']:.2f}; floor median {_ms((c.get('floor') or {}).get('rounds_median_ms'))} ms")
            else:
                x = fa["time"]["median_ms"] / floor
                how = f"medians; floor {_ms(floor)} ms"
            plan = head_plan(fa)
            d = (c.get("params") or {}).get("D")
            cause = (f". Cause: the floor is the GEMMs alone; an exact head also makes one pass over the [tokens, V] "
                     f"logits (the in-place softmax / log-softmax), whose cost is a few operations a logit against "
                     f"the GEMM's 2 D = {2 * d} flops, so its share is largest at small D") if x > limit and d else ""
            out.append((label, "met" if x <= limit else "gap",
                        f"{fa['impl']} {_ms(fa['time']['median_ms'])} ms = {x:.2f}x the floor "
                        f"({how}; {(c.get('floor') or {}).get('what', '')}){cause}"
                        + (f". Head plan: {plan}" if plan else "")))
    for name in ("dpo_step", "grpo_step"):
        found = [c for c in cases if c["case"] == name]
        label = f"e2e {name}: fastalign's trainer step >= {STEP_TARGET}x TRL's and plain PyTorch's"
        if not found:
            out.append((label, "not measured", "no such case in this run"))
        for c in found:
            rows = c.get("rows", [])
            fa = _best(rows, _is_fa)
            others = [r for r in _ok(rows) if _fam(r) in ("trl", "naive")]
            if not fa or not others or not any(_fam(r) == "trl" for r in others):
                out.append((label, "not measured", "fastalign's or TRL's row did not run"))
                continue
            got = [(r, *ratio(c, fa, r)) for r in others]
            short = [f"{r['impl']} {v:.2f}x" for r, v, _ in got if v is not None and v < STEP_TARGET]
            ev = "; ".join(f"{r['impl']} {_ratio_text(v, how)}" for r, v, how in got)
            causes = _step_causes(run, c, fa) if short else ""
            out.append((f"{label} ({_shape(c.get('params', {}))})", "gap" if short else "met",
                        f"{fa['impl']} vs {ev}" + (f". Short of {STEP_TARGET}x: {', '.join(short)}" if short else "")
                        + causes))
    return out


def _step_causes(run: dict, case: dict, fa: dict) -> str:
    """Where an e2e step's time goes, from the same run: the trainer's step with the fused head off against plain
    PyTorch (the trainer's own overhead) and the fused head's op case against its naive peer (the head)."""
    rows = _ok(case.get("rows", []))
    off = next((r for r in rows if _fam(r) == "fastalign" and "fused ops off" in r["impl"]), None)
    plain = next((r for r in rows if _fam(r) == "naive"), None)
    parts = []
    if off and plain:
        v, how = ratio(case, off, plain)
        if v is not None:
            parts.append(f"the same trainer step with fused ops off: plain / it {_ratio_text(v, how)}")
    head = next((c for c in run.get("cases", []) if c["case"] == STEP_HEAD_CASE.get(case["case"])
                 and c.get("headline", True)), None)
    if head:
        hfa = _best(head.get("rows", []), _is_fa)
        naive = next((r for r in _ok(head.get("rows", [])) if _fam(r) == "naive"), None)
        if hfa and naive:
            v, how = ratio(head, hfa, naive)
            if v is not None:
                parts.append(f"the fused head alone ({head['case']}): naive / fastalign {_ratio_text(v, how)}")
    return (". Where the time goes: " + "; ".join(parts)) if parts else ""


# ------------------------------------------------------------------------------------ GPU-shape estimates

GPU_SHAPE = {"N": 32768, "D": 3584, "V": 151936}
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM, bf16 dense tensor-core peak (the datasheet figure)
ASSUMED_FRACTION = 0.75
# (path, GEMM-equivalents of 2 N D V FLOPs each): docs/architecture.md (*Cost*), kernels/logprobs_notes.md
HEAD_PATHS = (
    ("forward only (scoring)", 1, "logits"),
    ("keep, trainable weight", 3, "logits, dh, dW"),
    ("keep, frozen weight", 2, "logits, dh"),
    ("recompute, trainable weight", 4, "logits, logits again in the backward, dh, dW"),
    ("recompute, frozen weight", 3, "logits, logits again in the backward, dh"),
)
_FLOOR_GEMMS = {"linear_logprobs.fwd": 1, "linear_logprobs.fwd_bwd": 3, "linear_logprobs.fwd_bwd_frozen": 2}


def gemm_rate(runs: list[dict]) -> tuple[float, str, bool]:
    """(FLOP/s, where it comes from, measured?): the fastest GEMM floor of a GPU run's linear_logprobs cases (the
    GPU shape preferred), else the assumed rate (ASSUMED_FRACTION of the H100's bf16 dense peak)."""
    best = None
    for run in runs:
        if _is_cpu(run):
            continue
        for c in run.get("cases", []):
            n_gemm = _FLOOR_GEMMS.get(c["case"])
            ms = (c.get("floor") or {}).get("ms")
            p = c.get("params", {})
            if not n_gemm or not ms or not all(k in p for k in "NDV"):
                continue
            rate = n_gemm * 2.0 * p["N"] * p["D"] * p["V"] / (ms / 1000.0)
            at_shape = all(p.get(k) == v for k, v in GPU_SHAPE.items())
            key = (at_shape, rate)
            if best is None or key > best[0]:
                best = (key, rate, f"measured: {c['case']} floor ({_shape(p)}), {_card(run)}, {run.get('date')}")
    if best:
        return best[1], best[2], True
    rate = ASSUMED_FRACTION * H100_BF16_DENSE_TFLOPS * 1e12
    return rate, (f"assumed: {ASSUMED_FRACTION:.0%} of the H100 SXM bf16 dense peak ({H100_BF16_DENSE_TFLOPS:g} "
                  f"TFLOP/s) — no GPU run with a GEMM floor is in this report"), False


def gpu_estimates(runs: list[dict]) -> list[dict]:
    """Per head path at the GPU shape (bf16, N=32768, D=3584, V=151936): GEMM-equivalents and the estimated time
    at :func:`gemm_rate`."""
    rate, source, measured = gemm_rate(runs)
    flops = 2.0 * GPU_SHAPE["N"] * GPU_SHAPE["D"] * GPU_SHAPE["V"]
    return [{"path": path, "gemms": k, "what": what, "ms": 1000.0 * k * flops / rate, "rate_tflops": rate / 1e12,
             "source": source, "measured_rate": measured} for path, k, what in HEAD_PATHS]


def gpu_estimate_section(runs: list[dict]) -> list[str]:
    est = gpu_estimates(runs)
    L = ["## Head paths at the GPU shape: estimates, not measurements", "",
         f"bf16, N={GPU_SHAPE['N']}, D={GPU_SHAPE['D']}, V={GPU_SHAPE['V']} (a Qwen2.5-7B head); one GEMM-equivalent "
         f"is 2NDV = {2 * GPU_SHAPE['N'] * GPU_SHAPE['D'] * GPU_SHAPE['V'] / 1e12:.1f} TFLOP. GEMM rate "
         f"{est[0]['rate_tflops']:.0f} TFLOP/s ({est[0]['source']}). The estimate is the GEMM work alone; the "
         "softmax passes and memory traffic come on top. A GPU run of the same shape replaces it.", "",
         "| head path | GEMM-equivalents | which | estimated ms |", "|---|---|---|---|"]
    for e in est:
        L.append(f"| {e['path']} | {e['gemms']} | {e['what']} | {e['ms']:.0f} |")
    measured = []
    for run in runs:
        if _is_cpu(run):
            continue
        for c in run.get("cases", []):
            p = c.get("params", {})
            if c["case"] in _FLOOR_GEMMS and all(p.get(k) == v for k, v in GPU_SHAPE.items()):
                fa = _best(c.get("rows", []), _is_fa)
                if fa:
                    plan = head_plan(fa)
                    measured.append(f"- measured {c['case']}: {fa['impl']} {_ms(fa['time']['median_ms'])} ms, floor "
                                    f"{_ms((c.get('floor') or {}).get('ms'))} ms ({_card(run)}, {run.get('date')})"
                                    + (f"; head plan: {plan}" if plan else ""))
    if measured:
        L += [""] + measured
    return L + [""]


# --------------------------------------------------------------- sections other benchmark modules add

def extra_sections(run: dict) -> list[str]:
    """Markdown lines other report modules add to a run's section: ``benchmarks/report_generation.py``, when it
    exists and defines ``sections(run) -> list[str]``, is called here (its rows come from its own cases)."""
    import importlib

    lines: list[str] = []
    for mod in EXTRA_SECTION_MODULES:
        try:
            m = importlib.import_module(f"{__package__}.{mod}" if __package__ else mod)
        except ImportError:
            continue
        fn = getattr(m, "sections", None)
        if callable(fn):
            lines += list(fn(run) or [])
    return lines


EXTRA_SECTION_MODULES = ("report_generation",)


# ------------------------------------------------------------------------------------------------------ plots

def _sweep_groups(run: dict):
    """linear_logprobs fwd+bwd cases grouped for the N sweep (same D, V) and the V sweep (same N, D)."""
    cases = [c for c in run.get("cases", []) if c["case"] == "linear_logprobs.fwd_bwd" and c.get("rows")]
    by_dv, by_nd = {}, {}
    for c in cases:
        p = c["params"]
        if p.get("sweep") != "V":
            by_dv.setdefault((p["D"], p["V"]), []).append(c)
        by_nd.setdefault((p["N"], p["D"]), []).append(c)
    n_group = max(by_dv.values(), key=len) if by_dv else []
    v_group = max(by_nd.values(), key=len) if by_nd else []
    return n_group if len(n_group) > 1 else [], v_group if len(v_group) > 1 else []


def write_plots(runs: list[dict], out_dir) -> list[str]:
    """One PNG per run with the N and V sweeps of linear_logprobs (time and memory per method)."""
    runs = report_generation.split(runs)[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for run in runs:
        n_group, v_group = _sweep_groups(run)
        panels = [(g, key) for g, key in ((n_group, "N"), (v_group, "V")) if g]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
        for (group, key), ax_row in zip(panels, axes):
            group = sorted(group, key=lambda c: c["params"][key])
            impls = []
            for c in group:
                for r in c["rows"]:
                    if r["impl"] not in impls:
                        impls.append(r["impl"])
            for impl in impls:
                xs, ts, ms = [], [], []
                for c in group:
                    r = next((r for r in _ok(c["rows"]) if r["impl"] == impl), None)
                    if r:
                        xs.append(c["params"][key])
                        ts.append(r["time"]["median_ms"])
                        ms.append((r.get("memory") or {}).get("peak_above_inputs_bytes"))
                if not xs:
                    continue
                style = "-" if impl.startswith("fastalign") else "--"
                ax_row[0].plot(xs, ts, style, marker="o", label=impl)
                if all(v is not None for v in ms):
                    ax_row[1].plot(xs, [v / 2**20 for v in ms], style, marker="o", label=impl)
            floors = [(c["params"][key], (c.get("floor") or {}).get("ms")) for c in group]
            floors = [(x, f) for x, f in floors if f]
            if floors:
                ax_row[0].plot(*zip(*floors), ":", color="k", label="3 GEMMs (floor)")
            fixed = {k: v for k, v in group[0]["params"].items() if k in ("N", "D", "V") and k != key}
            xlabel = "tokens N" if key == "N" else "vocabulary V"
            for ax, ylab in zip(ax_row, ("median ms (fwd+bwd)", "peak MiB above inputs")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylab)
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"linear_logprobs, {', '.join(f'{k}={v}' for k, v in fixed.items())} "
                             f"{group[0]['params'].get('dtype', '')}", fontsize=9)
            ax_row[0].legend(fontsize=7)
        fig.suptitle(f"{_card(run)} · {run.get('date')} · preset {run.get('preset')}"
                     + (" · CPU: not the GPU targets" if _is_cpu(run) else ""), fontsize=10)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"scaling-{slug(run)}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------------- render

def _case_table(c: dict) -> list[str]:
    lines = [f"#### {c['case']} — {_shape(c.get('params', {}))}", ""]
    if c.get("skipped"):
        return lines + [f"Skipped: {c['skipped']}.", ""]
    if c.get("error"):
        lines += [f"Error: {c['error']}", ""]
    for n in c.get("notes", []):
        lines.append(f"- {n}")
    floor = c.get("floor")
    if floor:
        lines.append(f"- floor: {_ms(floor.get('ms'))} ms — {floor.get('what')}")
    if not c.get("checked", True):
        lines.append("- agreement not checked at this sweep point")
    ld = c.get("load")
    if ld:
        lines.append(f"- load average (1 min): {_load(ld.get('start'))} at the start, {_load(ld.get('end'))} at the "
                     "end" + (f"; {c['rounds']} interleaved timing rounds" if c.get("interleaved") else ""))
    fa = _best(c.get("rows", []), _is_fa)
    pairs = [p for p in c.get("paired") or () if fa and p["fastalign"] == fa["impl"]]
    if pairs:
        lines.append(f"- other / {fa['impl']}, median of per-round ratios (p20–p80): " + "; ".join(
            f"{p['other']} {p['median']:.2f}x ({p['p20']:.2f}–{p['p80']:.2f})" for p in pairs))
    tokens = c.get("tokens")
    lines += ["", "| implementation | status | median ms | p20–p80 | min–max | tokens/s | peak above inputs "
              "| max abs deviation | agrees | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in c.get("rows", []):
        t = r.get("time") or {}
        mem = r.get("memory") or {}
        dev = ", ".join(f"{k} {v:.1e}" for k, v in (r.get("deviation") or {}).items() if v is not None) or "—"
        agrees = {True: "yes", False: "**no**", None: "—"}[r.get("agrees")]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        extra = r.get("extra", {})
        plan = head_plan(r)
        note = "; ".join(x for x in (r.get("detail", ""), extra.get("note", ""),
                                     f"path: {extra['path']}" if extra.get("path") else "",
                                     f"head plan: {plan}" if plan else "",
                                     f"optimizer: {extra['optimizer']}" if extra.get("optimizer") else "") if x)
        note = note.replace("|", "\\|").replace("\n", " ")
        tps = _rate(tokens / (t["median_ms"] / 1000.0)) if tokens and t.get("median_ms") else "—"
        lines.append(
            f"| {r['impl']} | {status} | {_ms(t.get('median_ms'))} | "
            f"{_span(t, 'p20_ms', 'p80_ms')} | {_span(t, 'min_ms', 'max_ms')} | {tps} | "
            f"{_mem(mem.get('peak_above_inputs_bytes'), mem.get('method')) if mem else '—'} | {dev} | {agrees} | "
            f"{note} |")
    lines.append("")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(runs: list[dict], *, plot_paths: list[str] = (), title: str = "Benchmarks", sources=(), notes=(),
           generated_by: str | None = None) -> str:
    runs, generation_runs = report_generation.split(runs)
    L = [f"# {title}", ""]
    L.append(f"<!-- generated by `{generated_by or 'python -m benchmarks'}` from {', '.join(map(str, sources))}; "
             "do not edit by hand: rerun the command -->")
    L.append("")
    L.append("Generated from the runner's JSON (`python -m benchmarks report RESULTS.json ...`); every number below "
             "was measured on the card and date stated with it. Rows marked missing name the import error; "
             "nothing is skipped silently.")
    L.append("")
    for n in notes:
        L.append(n)
        L.append("")
    if not any(not _is_cpu(r) for r in runs):
        L.append("**No GPU run is included here: every GPU target in docs/architecture.md (*Targets*) is still "
                 "open.** Run `bash benchmarks/gpu_check.sh` on a lent H100/H200 and regenerate this file with both "
                 "JSONs.")
        L.append("")
    if any(int(r.get("schema", 1)) < 2 for r in runs):
        L.append(OLD_SCHEMA_NOTE)
        L.append("")
    L += gpu_estimate_section(runs)
    for run in runs:
        L.append(f"## {_card(run)} — {run.get('date')} (preset `{run.get('preset')}`)")
        L.append("")
        if _is_cpu(run):
            L.append(GPU_DISCLAIMER)
            L.append("")
        mach = run.get("machine", {})
        L.append(f"- machine: {mach.get('cpu_model', mach.get('processor'))}, {mach.get('cpu_count')} CPUs, "
                 f"torch threads {mach.get('torch_threads')}"
                 + (f"; GPU {mach.get('card')} ({mach.get('card_memory_gib')} GiB, CUDA {mach.get('cuda_version')})"
                    if mach.get("cuda") else "; no GPU"))
        L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items()))
        L.append(f"- command: `{run.get('command')}` ({run.get('seconds')} s)"
                 + (f" at commit {run['commit']}" if run.get("commit") else ""))
        L.append(f"- timing: {run.get('timing_method')}"
                 + (f", {run['timing_order']}" if run.get("timing_order") else ", one implementation after another")
                 + f"; memory: {run.get('memory_method')}, one call per implementation on its own")
        load = run_load_line(run)
        L.append(f"- machine load: {load}" if load else "- machine load: not recorded (schema 1 run)")
        L.append(f"- compiled extension: {run.get('extension')}")
        if run.get("skipped_for_deadline"):
            L.append(f"- skipped at the run deadline: {'; '.join(run['skipped_for_deadline'])}")
        L.append("")
        L.append("### Headline")
        L.append("")
        L.append(headline_table([run], header=False))
        L.append("### Targets of issue #11 (this run)")
        L.append("")
        L.append("Judged on this run alone, from its JSON: per case the median of the paired per-round ratios "
                 "(schema 1 runs: the ratio of medians); against the GEMM floor, the median of the per-round ratios "
                 "fastalign / floor (the floor's GEMMs, into preallocated outputs, run last in each round; older runs: "
                 "fastalign's median over the floor's median).")
        L.append("")
        L.append("| target | status | evidence |")
        L.append("|---|---|---|")
        for name, status, ev in issue11_targets(run):
            L.append(f"| {name} | {status} | {_cell(ev)} |")
        L.append("")
        L.append("### Targets")
        L.append("")
        L.append("| target | status | evidence |")
        L.append("|---|---|---|")
        for name, status, ev in targets(run):
            L.append(f"| {name} | {status} | {ev} |")
        L.append("")
        L += extra_sections(run)
        mine = [p for p in plot_paths if slug(run) in Path(p).name]
        for p in mine:
            L.append(f"![scaling]({p})")
            L.append("")
        L.append("### All cases")
        L.append("")
        for c in run.get("cases", []):
            L += _case_table(c)
    L += report_generation.section(generation_runs)
    return "\n".join(L).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------- README

README_BEGIN, README_END = "<!-- section:benchmarks -->", "<!-- /section:benchmarks -->"

README_HOWTO = """## Benchmarks

`python -m benchmarks` (also `fastalign bench`) runs each case with every implementation it can import —
fastalign (each backend), naive PyTorch, TRL (`selective_log_softmax`, its chunked log-prob path, its DPO/GRPO
trainers' loss paths), Liger-Kernel, Cut Cross-Entropy, torch.compile, the Python GAE loop — on identical inputs
with a realistic logit scale, checks that they agree with a high-precision truth, then records median / p20 / p80 /
min / max time, peak memory above inputs and the floor (GEMMs measured in the same run, or bytes / measured copy
bandwidth). A peer that is not installed is listed as missing with its import error.

**How the ratios are computed.** After each implementation's first call (the agreement check) and one warm-up
call, the implementations of a case are timed in interleaved rounds — A B C, A B C, ... — so that whatever else
the machine is doing slows every implementation of a round alike. A ratio "other / fastalign" is the median over
the rounds of (the other's time / fastalign's time *in the same round*); above 1 means fastalign is faster. The
medians are shown next to it, and peak memory is measured separately, one call per implementation.

**How to read the load.** Each run records `os.getloadavg()` (the 1-minute figure is shown) at its start and end
and at the start and end of every case, with the CPU count and torch's thread count. A load at or above the CPU
count means other processes were competing for the cores: the medians are then inflated and spread, while the
paired ratios stay usable; compare runs at similar load, and rerun a case whose ratio sits near a target.

```bash
python -m benchmarks --preset cpu --out bench_out   # about 3 minutes on 2 cores: results.json, results.md, PNG plots
python -m benchmarks --cases linear_logprobs --n 4096 --d 1024 --v 32000 --dtype bf16   # a custom shape
pytest benchmarks/ --benchmark-only                 # pytest-benchmark suites of the CPU ops (not in the test command)
python -m benchmarks report bench_out/results.json --out BENCHMARKS.md --readme README.md   # regenerate the report
```

On a lent H100/H200, one command runs the GPU tests, builds the CUDA extension and runs `--preset gpu` (the shapes
of the GPU targets in docs/architecture.md, *Targets*, plus an N/V sweep) in about 8 minutes; fetch the peers'
wheels first on a machine with PyPI:

```bash
bash benchmarks/fetch_wheels.sh    # TRL, Liger-Kernel, Cut Cross-Entropy (+ datasets, dill, multiprocess) -> .whl/
bash benchmarks/gpu_check.sh       # on the GPU machine, with .whl/ carried; results under $OUT/bench
```

[BENCHMARKS.md](BENCHMARKS.md) (per-case tables, targets, plots) and the table below are generated from the runs
kept in `benchmarks/results/`: `python -m benchmarks report benchmarks/results/*.json
benchmarks/results/generation/cpu.json --out BENCHMARKS.md --readme README.md`. Headline:
"""


OLD_SCHEMA_NOTE = ("Runs marked (m) predate interleaved timing (schema 1): their ratios are ratios of medians taken one "
                   "implementation after another, their e2e `dpo_step` / `grpo_step` rows time the loss forward + "
                   "backward only (not the whole trainer step), and their load was not recorded; a new run of the "
                   "same command replaces them.")


def readme_section(runs: list[dict]) -> str:
    runs = report_generation.split(runs)[0]
    lines = [README_BEGIN, README_HOWTO, headline_table(runs).rstrip(), ""]
    if any(int(r.get("schema", 1)) < 2 for r in runs):
        lines.append(OLD_SCHEMA_NOTE)
        lines.append("")
    if not any(not _is_cpu(r) for r in runs):
        lines.append("No GPU has been measured yet: every GPU target in docs/architecture.md (*Targets*) is open, "
                     "and no speed-up on a GPU is claimed.")
        lines.append("")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(path, runs: list[dict]) -> None:
    """Replace the text between the benchmark markers of README.md, and nothing else."""
    path = Path(path)
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path}: markers {README_BEGIN} ... {README_END} not found")
    path.write_text(text[:begin] + readme_section(runs) + text[end + len(README_END):])
