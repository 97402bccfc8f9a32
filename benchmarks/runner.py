"""Run cases: build inputs once, check every implementation against the truth, then time and measure it.

A case module (logprobs.py, rl.py, linear_losses.py, e2e.py) returns :class:`Case` objects; each holds its inputs
factory, a truth function and a list of :class:`Impl`. An Impl that is unavailable carries ``missing`` (the import
error) and is reported with that reason; a fastalign backend that is unavailable here is reported missing with the
reason its op gives when asked for it (:func:`backend_refused`). An Impl's ``prepare(inputs)`` returns a zero-argument
``step`` that does one full unit of work (e.g. forward + backward) and returns a dict of outputs for the check.

Timing survives a noisy machine: after every implementation's first call (the agreement check) and one warm-up
call each, the implementations are called in rounds, A B C A B C ..., and each case reports, for every fastalign
row and every other row, the median over rounds of the per-round ratio other / fastalign (``paired``), next to
each row's own median. Load on a shared machine moves every implementation of a round alike, so the paired ratio
is steadier than a ratio of medians taken at different times. Memory is measured afterwards, one call per
implementation on its own. ``load`` records ``os.getloadavg()`` at the start and end of each case.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .agreement import agreement
from .memory import measure_memory
from .timing import clear_grads, measure_time, summarize, sync


@dataclass
class Prepared:
    step: Callable[[], dict[str, torch.Tensor] | None]
    grad_to_none: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Impl:
    name: str
    family: str  # fastalign | naive | trl | liger | cce | compile | python-loop | floor
    prepare: Callable[[dict], Prepared] | None = None
    missing: str = ""  # why this implementation is absent; "" when present
    note: str = ""
    is_baseline: bool = False  # the same-dtype plain-PyTorch computation of the accuracy rule (agreement.py)


@dataclass
class Case:
    suite: str  # "ops" | "e2e"
    name: str  # e.g. "linear_logprobs.fwd_bwd"
    params: dict
    device: torch.device
    dtype: torch.dtype
    make_inputs: Callable[[], dict]
    truth: Callable[[dict], dict[str, torch.Tensor]] | None
    impls: list[Impl]
    floor: Callable[[dict, str], dict] | None = None  # (inputs, timer) -> {"ms": float, "what": str}
    tokens: int | None = None  # for the scaling plots
    check: bool = True  # sweep points skip the agreement check to save device time
    headline: bool = True  # main shapes (the report's headline table) vs sweep points
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One implementation's result in one case (serialised into the JSON)."""

    impl: str
    status: str  # "ok" | "missing" | "error" | "timeout" | "skipped"
    detail: str = ""
    time: dict | None = None
    memory: dict | None = None
    deviation: dict | None = None
    agrees: bool | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class CaseTimeout(Exception):
    """Raised by :func:`time_limit` when one implementation runs past its share of the budget."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Interrupt Python code after ``seconds`` (SIGALRM; main thread only). A CUDA kernel in flight finishes first,
    so the limit is honoured at the next Python bytecode — enough to stop a slow peer's timing loop."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first[:300]}"


# fastalign's dispatcher, asked for one backend explicitly: "<op>: backend='<name>' is not implemented for this
# op ..." (ValueError), "... needs CUDA tensors ...", "... needs the compiled extension ...", "... requested but
# triton is not importable ..." (RuntimeError)
_REFUSAL = re.compile(r"\w+: backend='\w+' (is not implemented for this op|needs |requested but )")


def backend_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is fastalign's dispatcher refusing a requested backend (not implemented for that op, or
    unavailable here): the row is then missing, with the op's reason, rather than failed."""
    return isinstance(exc, (ValueError, RuntimeError)) and _REFUSAL.match(str(exc)) is not None


def load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 minutes), rounded; None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def paired_ratios(peer_ms: list[float | None], ref_ms: list[float | None]) -> dict | None:
    """The median over rounds of ``peer_ms[r] / ref_ms[r]`` (both timed in round r), with how many rounds paired
    and the 20th/80th percentiles of the per-round ratios; None when no round has both."""
    ratios = sorted(p / r for p, r in zip(peer_ms, ref_ms) if p is not None and r is not None and r > 0)
    if not ratios:
        return None

    def q(f: float) -> float:
        return ratios[min(len(ratios) - 1, max(0, round(f * (len(ratios) - 1))))]

    return {"median": statistics.median(ratios), "p20": q(0.2), "p80": q(0.8), "rounds": len(ratios)}


def run_case(case: Case, *, budget_s: float, impl_timeout_s: float | None, timer: str = "events",
             log=print, max_rounds: int = 50, min_rounds: int = 5) -> dict:
    """Run every implementation of ``case``; never raises for an implementation's failure.

    Order: build inputs, the truth and the floor; then each implementation's ``prepare`` and first call (its
    agreement check), the same-dtype baseline first; then one warm-up call of each; then rounds A B C A B C ...,
    each implementation timed once per round, so a change in the machine's load touches every implementation of a
    round alike; then one memory measurement per implementation, each on its own. The rounds: enough for
    ``budget_s`` of timed calls per implementation (``min_rounds``..``max_rounds``). Each row keeps its per-round
    times (``time["round_ms"]``, None after it timed out); ``paired`` holds, for every fastalign row and every
    other row, the median of the per-round ratios other / fastalign. ``load``: ``os.getloadavg()`` at the start
    and end of the case.

    ``timer``: how CUDA calls (and the floor) are timed, see :func:`benchmarks.timing.measure_time`; with
    ``"do_bench"`` the implementations are timed one after the other (do_bench owns its loop), not interleaved."""
    t_case = time.perf_counter()
    out: dict[str, Any] = {
        "suite": case.suite, "case": case.name, "params": case.params, "device": str(case.device),
        "dtype": str(case.dtype).replace("torch.", ""), "tokens": case.tokens, "checked": case.check,
        "headline": case.headline, "notes": list(case.notes), "rows": [], "floor": None,
        "load": {"start": load_average()},
    }
    torch.manual_seed(0)
    try:
        inputs = case.make_inputs()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"inputs: {error_text(exc)}"
        log(f"  ! {case.name}: could not build inputs: {out['error']}")
        out["load"]["end"] = load_average()
        return out
    truth = None
    if case.check and case.truth is not None:
        try:
            with time_limit(impl_timeout_s):
                truth = case.truth(inputs)
        except Exception as exc:  # noqa: BLE001
            out["notes"].append(f"truth failed, agreement not checked: {error_text(exc)}")
    floor_step = None
    if case.floor is not None:
        try:
            with time_limit(impl_timeout_s):
                out["floor"] = case.floor(inputs, timer)
            floor_step = out["floor"].pop("step", None)
        except Exception as exc:  # noqa: BLE001
            out["floor"] = {"ms": None, "what": f"floor failed: {error_text(exc)}"}
    # the same-dtype baseline first: its error against the truth sets the others' tolerance
    order = sorted(case.impls, key=lambda i: not i.is_baseline)
    live: list[_Live] = []
    rows: dict[str, Row] = {}
    baseline_dev: dict[str, float] | None = None
    for impl in order:
        row, lv = _check_impl(case, impl, inputs, truth, baseline_dev, impl_timeout_s)
        rows[impl.name] = row
        if impl.is_baseline and row.deviation:
            baseline_dev = row.deviation
        if lv is not None:
            live.append(lv)
    live.sort(key=lambda lv: case.impls.index(lv.impl))  # from here on, declaration order
    interleaved = not (case.device.type == "cuda" and timer == "do_bench")
    floor_lv = None
    if interleaved and floor_step is not None:
        # the floor takes part in the rounds (last in each), so that "x the floor" is a paired ratio too
        floor_lv = _Live(Impl("GEMM floor", "floor"), Row("GEMM floor", "ok", ""),
                         Prepared(lambda: (floor_step(), None)[1]), timeout_s=impl_timeout_s)
    if interleaved:
        out["rounds"] = _interleave(case, live + ([floor_lv] if floor_lv else []), budget_s, max_rounds, min_rounds)
        if floor_lv is not None:
            _floor_rounds(out["floor"], floor_lv, live)
    else:
        for lv in live:
            _timed(lv, lambda lv=lv: _block_time(case, lv, budget_s, timer))
    for lv in live:
        if lv.row.status == "ok":
            if lv.samples:
                method = "cuda-events" if case.device.type == "cuda" else "cpu-wall-clock"
                lv.row.time = {**summarize(lv.samples, f"{method}, interleaved rounds").__dict__,
                               "round_ms": lv.rounds}
            _timed(lv, lambda lv=lv: setattr(lv.row, "memory", measure_memory(
                lv.prepared.step, case.device, lv.prepared.grad_to_none).__dict__), stage="memory")
            lv.row.extra.update(lv.prepared.extra)
        lv.prepared = None
        if case.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    for name in [i.name for i in order]:
        _log_row(log, case, rows[name])
    # report rows in declaration order
    out["rows"] = [rows[i.name].to_json() for i in case.impls]
    out["interleaved"] = interleaved
    out["paired"] = paired_table(out["rows"]) if interleaved else []
    out["seconds"] = round(time.perf_counter() - t_case, 2)
    out["load"]["end"] = load_average()
    del inputs
    gc.collect()
    return out


def _floor_rounds(floor: dict, floor_lv: _Live, live: list[_Live]) -> None:
    """Record the floor's per-round times and, for every fastalign row, the median over rounds of its time / the
    floor's time in the same round (``floor["paired"]``: {impl: {median, p20, p80, rounds}})."""
    if floor_lv.row.status != "ok" or not floor_lv.samples:
        floor["note"] = f"not interleaved: {floor_lv.row.status}: {floor_lv.row.detail}"
        return
    floor["round_ms"] = floor_lv.rounds
    floor["rounds_median_ms"] = statistics.median(floor_lv.samples)
    floor["paired"] = {}
    for lv in live:
        if lv.impl.family == "fastalign" and lv.rounds:
            pr = paired_ratios(lv.rounds, floor_lv.rounds)
            if pr is not None:
                floor["paired"][lv.impl.name] = pr


def paired_table(rows: list[dict]) -> list[dict]:
    """For every fastalign row F and every other row P that both have per-round times: the median over rounds of
    P's time / F's time (> 1: fastalign is faster)."""
    timed = [r for r in rows if r.get("status") == "ok" and (r.get("time") or {}).get("round_ms")]
    out = []
    for f in timed:
        if f.get("extra", {}).get("family") != "fastalign":
            continue
        for p in timed:
            if p is f:
                continue
            pr = paired_ratios(p["time"]["round_ms"], f["time"]["round_ms"])
            if pr is not None:
                out.append({"fastalign": f["impl"], "other": p["impl"], **pr})
    return out


@dataclass
class _Live:
    """An implementation that passed its first call, while the case is timed."""

    impl: Impl
    row: Row
    prepared: Prepared
    spent_s: float = 0.0  # wall time it has used (first call, warm-up, rounds, memory) against impl_timeout_s
    timeout_s: float | None = None
    est_s: float = 0.0
    samples: list[float] = field(default_factory=list)
    rounds: list[float | None] = field(default_factory=list)


def _check_impl(case, impl, inputs, truth, baseline_dev, impl_timeout_s) -> tuple[Row, _Live | None]:
    """``prepare`` and the first call, compared with the truth. Returns the row and, when it ran, its _Live."""
    if impl.missing:
        return Row(impl.name, "missing", impl.missing, extra={"family": impl.family, "note": impl.note}), None
    row = Row(impl.name, "ok", impl.note, extra={"family": impl.family})
    stage = "prepare"
    t_start = time.perf_counter()
    try:
        with time_limit(impl_timeout_s):
            prepared = impl.prepare(inputs)
            row.extra.update(prepared.extra)
            stage = "first call"
            clear_grads(prepared.grad_to_none)
            t0 = time.perf_counter()
            outputs = prepared.step()
            sync(case.device)
            first_s = time.perf_counter() - t0
            row.extra.update(prepared.extra)  # a step may fill its extra (e.g. the head's plan) when it runs
            if truth is not None and outputs:
                stage = "agreement"
                row.deviation, row.agrees = agreement(outputs, truth, baseline_dev, case.dtype)
            del outputs
            clear_grads(prepared.grad_to_none)
    except CaseTimeout as exc:
        row.status, row.detail = "timeout", f"{stage}: {exc}"
        return row, None
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
        row.status, row.detail = "error", f"{stage}: {error_text(exc)}"
        if backend_refused(exc):
            row.status, row.detail = "missing", error_text(exc)
        return row, None
    return row, _Live(impl, row, prepared, spent_s=time.perf_counter() - t_start, timeout_s=impl_timeout_s,
                      est_s=first_s)


def _timed(lv: _Live, fn: Callable[[], Any], stage: str = "timing") -> bool:
    """Run ``fn`` within what is left of ``lv``'s time; a timeout or error marks its row. True when it ran."""
    left = None if not lv.timeout_s else max(1e-3, lv.timeout_s - lv.spent_s)
    t0 = time.perf_counter()
    try:
        with time_limit(left):
            fn()
        return True
    except CaseTimeout:
        lv.row.status, lv.row.detail = "timeout", f"{stage}: timed out after {lv.timeout_s:.0f} s in all"
    except Exception as exc:  # noqa: BLE001
        lv.row.status, lv.row.detail = "error", f"{stage}: {error_text(exc)}"
    finally:
        lv.spent_s += time.perf_counter() - t0
    return False


def _block_time(case, lv: _Live, budget_s: float, timer: str) -> None:
    lv.row.time = measure_time(lv.prepared.step, case.device, budget_s=budget_s,
                               grad_to_none=lv.prepared.grad_to_none, first_s=lv.est_s, timer=timer).__dict__


class _CallTimer:
    """Times one call: wall clock on CPU; on CUDA, events around it with L2 flushed before (as do_bench), read
    once the round is over (one synchronisation per round)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None
        self.pending: list[tuple[_Live, Any, Any]] = []

    def call(self, lv: _Live) -> None:
        clear_grads(lv.prepared.grad_to_none)
        if self.cuda:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            lv.prepared.step()
            end.record()
            self.pending.append((lv, start, end))
        else:
            t0 = time.perf_counter()
            lv.prepared.step()
            self.pending.append((lv, 1000.0 * (time.perf_counter() - t0), None))
        # every implementation's inputs stay alive during the rounds; its gradients need not (on a GPU they can
        # be most of the memory), and freeing them after the end event is stream-ordered
        clear_grads(lv.prepared.grad_to_none)

    def collect(self) -> dict[int, float]:
        """{id(live): ms} of the calls since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
        got = {id(lv): (a.elapsed_time(b) if self.cuda else a) for lv, a, b in self.pending}
        self.pending = []
        return got


def _interleave(case: Case, live: list[_Live], budget_s: float, max_rounds: int, min_rounds: int) -> int:
    """One warm-up call of each, then rounds of one timed call of each, in declaration order. Returns the number
    of rounds run."""
    for lv in live:  # warm-up (the first call may have compiled, autotuned or loaded lazily); re-estimates
        def warm(lv=lv):
            clear_grads(lv.prepared.grad_to_none)
            t0 = time.perf_counter()
            lv.prepared.step()
            sync(case.device)
            lv.est_s = time.perf_counter() - t0
            clear_grads(lv.prepared.grad_to_none)

        _timed(lv, warm, stage="warm-up")
    active = [lv for lv in live if lv.row.status == "ok"]
    if not active:
        return 0
    per_round = sum(lv.est_s for lv in active)
    rounds = int(max(min_rounds, min(max_rounds, budget_s * len(active) / max(per_round, 1e-6))))
    timer = _CallTimer(case.device)
    done = 0
    for _ in range(rounds):
        active = [lv for lv in active if lv.row.status == "ok"]
        if not active:
            break
        for lv in active:
            _timed(lv, lambda lv=lv: timer.call(lv))
        got = timer.collect()
        for lv in live:
            ms = got.get(id(lv)) if lv.row.status == "ok" else None
            lv.rounds.append(ms)
            if ms is not None:
                lv.samples.append(ms)
        done += 1
    return done


def _log_row(log, case: Case, row: Row) -> None:
    if row.status != "ok":
        log(f"  {case.name:<34} {row.impl:<38} {row.status}: {row.detail[:150]}")
        return
    t = row.time or {}
    mem = (row.memory or {}).get("peak_above_inputs_bytes")
    agree = "" if row.agrees is None else ("agrees" if row.agrees else "DISAGREES")
    dev = ", ".join(f"{k}={v:.2e}" for k, v in (row.deviation or {}).items() if v is not None)
    log(f"  {case.name:<34} {row.impl:<38} {t.get('median_ms', float('nan')):10.3f} ms  "
        f"{(mem or 0) / 2**20:9.1f} MiB  {agree} {dev}")
