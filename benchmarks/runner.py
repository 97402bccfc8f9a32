"""Run cases: build inputs once, check every implementation against the truth, then time and measure it.

A case module (logprobs.py, rl.py, linear_losses.py, e2e.py) returns :class:`Case` objects; each holds its inputs
factory, a truth function and a list of :class:`Impl`. An Impl that is unavailable carries ``missing`` (the import
error) and is reported with that reason; a fastalign backend that is unavailable here is reported missing with the
reason its op gives when asked for it (:func:`backend_refused`). An Impl's ``prepare(inputs)`` returns a zero-argument
``step`` that does one full unit of work (e.g. forward + backward) and returns a dict of outputs for the check.
"""
from __future__ import annotations

import contextlib
import gc
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .agreement import agreement
from .memory import measure_memory
from .timing import measure_time, sync


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


def run_case(case: Case, *, budget_s: float, impl_timeout_s: float | None, timer: str = "events",
             log=print) -> dict:
    """Run every implementation of ``case``; never raises for an implementation's failure.

    ``timer``: how CUDA calls (and the floor) are timed, see :func:`benchmarks.timing.measure_time`."""
    t_case = time.perf_counter()
    out: dict[str, Any] = {
        "suite": case.suite, "case": case.name, "params": case.params, "device": str(case.device),
        "dtype": str(case.dtype).replace("torch.", ""), "tokens": case.tokens, "checked": case.check,
        "headline": case.headline, "notes": list(case.notes), "rows": [], "floor": None,
    }
    torch.manual_seed(0)
    try:
        inputs = case.make_inputs()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"inputs: {error_text(exc)}"
        log(f"  ! {case.name}: could not build inputs: {out['error']}")
        return out
    truth = None
    if case.check and case.truth is not None:
        try:
            with time_limit(impl_timeout_s):
                truth = case.truth(inputs)
        except Exception as exc:  # noqa: BLE001
            out["notes"].append(f"truth failed, agreement not checked: {error_text(exc)}")
    if case.floor is not None:
        try:
            with time_limit(impl_timeout_s):
                out["floor"] = case.floor(inputs, timer)
        except Exception as exc:  # noqa: BLE001
            out["floor"] = {"ms": None, "what": f"floor failed: {error_text(exc)}"}
    baseline_dev: dict[str, float] | None = None
    # the same-dtype baseline first: its error against the truth sets the others' tolerance
    order = sorted(case.impls, key=lambda i: not i.is_baseline)
    for impl in order:
        row = _run_impl(case, impl, inputs, truth, baseline_dev, budget_s, impl_timeout_s, timer)
        if impl.is_baseline and row.deviation:
            baseline_dev = row.deviation
        out["rows"].append(row.to_json())
        _log_row(log, case, row)
        if case.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    # report rows in declaration order
    names = [i.name for i in case.impls]
    out["rows"].sort(key=lambda r: names.index(r["impl"]))
    out["seconds"] = round(time.perf_counter() - t_case, 2)
    del inputs
    gc.collect()
    return out


def _run_impl(case, impl, inputs, truth, baseline_dev, budget_s, impl_timeout_s, timer) -> Row:
    if impl.missing:
        return Row(impl.name, "missing", impl.missing, extra={"family": impl.family, "note": impl.note})
    row = Row(impl.name, "ok", impl.note, extra={"family": impl.family})
    stage = "prepare"
    try:
        with time_limit(impl_timeout_s):
            prepared = impl.prepare(inputs)
            row.extra.update(prepared.extra)
            stage = "first call"
            for t in prepared.grad_to_none:
                t.grad = None
            t0 = time.perf_counter()
            outputs = prepared.step()
            sync(case.device)
            first_s = time.perf_counter() - t0
            if truth is not None and outputs:
                stage = "agreement"
                row.deviation, row.agrees = agreement(outputs, truth, baseline_dev, case.dtype)
            del outputs
            stage = "timing"
            row.time = measure_time(prepared.step, case.device, budget_s=budget_s,
                                    grad_to_none=prepared.grad_to_none, first_s=first_s, timer=timer).__dict__
            stage = "memory"
            row.memory = measure_memory(prepared.step, case.device, prepared.grad_to_none).__dict__
            del prepared
    except CaseTimeout as exc:
        row.status, row.detail = "timeout", f"{stage}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
        row.status, row.detail = "error", f"{stage}: {error_text(exc)}"
        if backend_refused(exc):
            row.status, row.detail = "missing", error_text(exc)
    return row


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
