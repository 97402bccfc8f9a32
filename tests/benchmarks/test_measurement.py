"""The runner's measurement (interleaved rounds, paired ratios, load) and the report's judgement of issue #11's
targets and GPU-shape estimates, on hand-built cases and JSON. No timing is asserted: only the order of calls, the
arithmetic and what the report says about given numbers."""
import json
import time
from pathlib import Path

import pytest
import torch

from fastalign.benchmarks import report, runner
from fastalign.benchmarks.runner import Case, Impl, Prepared, paired_ratios, run_case

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- interleaving

def _recording_case(calls: list, names=("A", "B", "C"), baseline="B"):
    def impl(name):
        def prepare(inputs):
            calls.append(("prepare", name))

            def step():
                calls.append(("call", name))
                return {"y": inputs["x"] * 2}

            return Prepared(step)

        return Impl(name, "fastalign" if name == "A" else "naive", prepare, is_baseline=name == baseline)

    return Case(suite="ops", name="toy", params={"N": 3}, device=torch.device("cpu"), dtype=torch.float32,
                make_inputs=lambda: {"x": torch.arange(3.0)}, truth=lambda x: {"y": x["x"] * 2},
                impls=[impl(n) for n in names])


def test_implementations_are_called_in_interleaved_rounds():
    calls = []
    res = run_case(_recording_case(calls), budget_s=0.0, impl_timeout_s=30, log=lambda *a: None, min_rounds=4,
                   max_rounds=4)
    # the check: the baseline (B) first, each prepared then called once; then one warm-up call each in declaration
    # order; then 4 rounds A B C; then one memory call each
    assert calls[:6] == [("prepare", "B"), ("call", "B"), ("prepare", "A"), ("call", "A"), ("prepare", "C"),
                         ("call", "C")]
    rest = [name for kind, name in calls[6:]]
    assert all(kind == "call" for kind, _ in calls[6:])
    assert rest == ["A", "B", "C"] + ["A", "B", "C"] * 4 + ["A", "B", "C"]
    assert res["interleaved"] is True and res["rounds"] == 4
    rows = {r["impl"]: r for r in res["rows"]}
    assert [r["impl"] for r in res["rows"]] == ["A", "B", "C"]  # declaration order in the JSON
    for r in rows.values():
        assert r["status"] == "ok" and r["agrees"] is True
        assert len(r["time"]["round_ms"]) == 4 and r["time"]["reps"] == 4
        assert "interleaved" in r["time"]["method"]
    # one paired entry per (fastalign row, other row)
    assert {(p["fastalign"], p["other"]) for p in res["paired"]} == {("A", "B"), ("A", "C")}
    assert all(p["rounds"] == 4 for p in res["paired"])


def test_the_floor_runs_last_in_every_round_and_is_paired_with_the_fastalign_rows():
    calls = []
    case = _recording_case(calls)
    case.floor = lambda inputs, timer: {"ms": 1.0, "median_ms": 1.0, "what": "toy floor",
                                        "step": lambda: calls.append(("call", "floor"))}
    res = run_case(case, budget_s=0.0, impl_timeout_s=30, log=lambda *a: None, min_rounds=3, max_rounds=3)
    rest = [name for _, name in calls[6:]]
    # warm-up of each (the floor last), 3 rounds A B C floor, then one memory call per implementation (not the floor)
    assert rest == ["A", "B", "C", "floor"] + ["A", "B", "C", "floor"] * 3 + ["A", "B", "C"]
    floor = res["floor"]
    assert "step" not in floor and len(floor["round_ms"]) == 3 and floor["rounds_median_ms"] > 0
    assert set(floor["paired"]) == {"A"} and floor["paired"]["A"]["rounds"] == 3
    assert [r["impl"] for r in res["rows"]] == ["A", "B", "C"]  # the floor is not a row
    json.dumps(res)  # nothing unserialisable is left in the JSON


def test_an_implementation_that_times_out_leaves_the_rounds_and_keeps_its_reason():
    def fast(inputs):
        return Prepared(lambda: {"y": inputs["x"]})

    def slow(inputs):
        def step():
            time.sleep(0.15)
            return {"y": inputs["x"]}

        return Prepared(step)

    case = Case(suite="ops", name="toy", params={}, device=torch.device("cpu"), dtype=torch.float32,
                make_inputs=lambda: {"x": torch.ones(2)}, truth=None,
                impls=[Impl("fa", "fastalign", fast), Impl("slow", "naive", slow)])
    res = run_case(case, budget_s=0.0, impl_timeout_s=0.5, log=lambda *a: None, min_rounds=10, max_rounds=10)
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["slow"]["status"] == "timeout" and "timed out" in rows["slow"]["detail"]
    assert rows["fa"]["status"] == "ok" and len(rows["fa"]["time"]["round_ms"]) == 10


def test_paired_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    peer, fa = [3.0, 10.0, 20.0], [1.0, 10.0, 5.0]  # per-round ratios 3, 1, 4; medians 10 / 5 = 2
    got = paired_ratios(peer, fa)
    assert got["median"] == pytest.approx(3.0) and got["rounds"] == 3
    assert got["p20"] == pytest.approx(1.0) and got["p80"] == pytest.approx(4.0)
    # rounds where either side has no time (it timed out) are not paired
    got = paired_ratios([2.0, None, 6.0, 8.0], [1.0, 1.0, None, 2.0])
    assert got["median"] == pytest.approx(3.0) and got["rounds"] == 2  # ratios 2 and 4
    assert paired_ratios([None], [1.0]) is None


def test_load_is_recorded_at_the_start_and_end_of_each_case(monkeypatch):
    loads = iter([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)])
    monkeypatch.setattr(runner.os, "getloadavg", lambda: next(loads))
    res = run_case(_recording_case([]), budget_s=0.0, impl_timeout_s=30, log=lambda *a: None, min_rounds=2,
                   max_rounds=2)
    assert res["load"] == {"start": [1.0, 2.0, 3.0], "end": [4.0, 5.0, 6.0]}


def test_load_is_none_where_the_platform_has_no_load_average(monkeypatch):
    def missing():
        raise OSError("no load average")

    monkeypatch.setattr(runner.os, "getloadavg", missing)
    assert runner.load_average() is None


# ------------------------------------------------------------------------------------ targets (hand JSON)

def _row(impl, family, ms, mem, plan=None, rounds=None):
    extra = {"family": family, **({"head_plan": plan} if plan else {})}
    return {"impl": impl, "status": "ok", "detail": "", "extra": extra, "agrees": True,
            "time": {"median_ms": ms, "p20_ms": ms, "p80_ms": ms, "min_ms": ms, "max_ms": ms, "reps": 3,
                     "method": "cpu-wall-clock, interleaved rounds", **({"round_ms": rounds} if rounds else {})},
            "memory": {"peak_above_inputs_bytes": mem, "method": "cpu-rss-sampled"}}


def _case(name, rows, paired=None, floor=None, params=None, **kw):
    return {"suite": "ops", "case": name, "params": params or {"N": 512, "D": 128, "V": 8000, "dtype": "float32"},
            "rows": rows, "paired": paired or [], "floor": floor, "headline": True, "checked": True,
            "interleaved": paired is not None, "rounds": 5, "load": {"start": [1.5, 1, 1], "end": [2.5, 1, 1]},
            **kw}


def _pair(fa, other, median):
    return {"fastalign": fa, "other": other, "median": median, "p20": median, "p80": median, "rounds": 5}


MiB = 2**20


def _run(cases, cuda=False):
    return {"schema": 2, "date": "2026-01-01 00:00 UTC", "preset": "cpu", "command": "python -m benchmarks",
            "machine": {"cuda": cuda, "card": "NVIDIA H200" if cuda else "CPU (no GPU)", "cpu_count": 2,
                        "torch_threads": 2},
            "versions": {"torch": "2.x"}, "load": {"start": [1.2, 1, 1], "end": [2.4, 1, 1], "cpu_count": 2,
                                                   "torch_threads": 2},
            "cases": cases}


def _status(targets, prefix):
    found = [(s, ev) for name, s, ev in targets if name.startswith(prefix)]
    assert found, (prefix, [n for n, _, _ in targets])
    return found[0]


def test_case_target_met_gap_and_memory_trade():
    fa, naive, trl = (_row("fastalign[torch]", "fastalign", 10, 5 * MiB), _row("naive", "naive", 12, 40 * MiB),
                      _row("TRL chunked", "trl", 9, 2 * MiB))
    # the paired ratio decides, not the medians: TRL's median is lower, its paired ratio says fastalign is ahead
    met = _case("x.met", [fa, naive, trl], [_pair("fastalign[torch]", "naive", 1.3),
                                            _pair("fastalign[torch]", "TRL chunked", 1.05)])
    status, ev = report.case_target(met)
    assert status == "gap" and "more peak memory than TRL chunked" in ev  # 5 MiB > 2 MiB + slack
    cheap = dict(trl, memory={"peak_above_inputs_bytes": 5 * MiB, "method": "cpu-rss-sampled"})
    met = _case("x.met", [fa, naive, cheap], [_pair("fastalign[torch]", "naive", 1.3),
                                              _pair("fastalign[torch]", "TRL chunked", 1.05)])
    assert report.case_target(met) == ("met", "fastalign[torch] vs naive 1.30x; TRL chunked 1.05x")
    # a faster peer that uses more memory is named, and is no gap
    near = dict(naive, memory={"peak_above_inputs_bytes": 6 * MiB + 1, "method": "cpu-rss-sampled"})
    status, ev = report.case_target(_case("x.near", [fa, near], [_pair("fastalign[torch]", "naive", 0.8)]))
    assert status == "gap"  # 6 MiB against 5: not enough more memory to be the reason it is faster
    trade = _case("x.trade", [fa, naive], [_pair("fastalign[torch]", "naive", 0.8)])
    status, ev = report.case_target(trade)
    assert status == "met" and "naive is ahead (other / fastalign 0.80x) using more peak memory" in ev
    # a faster peer with less memory is a gap
    behind = _case("x.behind", [fa, dict(trl, memory={"peak_above_inputs_bytes": 6 * MiB, "method": "cpu"})],
                   [_pair("fastalign[torch]", "TRL chunked", 0.9)])
    status, ev = report.case_target(behind)
    assert status == "gap" and "behind TRL chunked (other / fastalign 0.90x)" in ev
    # the "fused ops off" fastalign rows are neither fastalign's entry nor a peer
    off = _row("fastalign trainer step, fused ops off (x)", "fastalign", 1, 0)
    status, _ = report.case_target(_case("x.off", [fa, off, cheap], [_pair("fastalign[torch]", "TRL chunked", 1.1)]))
    assert status == "met"
    assert report.case_target(_case("x.alone", [fa], []))[0] == "not measured"


def test_schema_1_cases_fall_back_to_the_ratio_of_medians():
    c = _case("x", [_row("fastalign[torch]", "fastalign", 10, 0), _row("naive", "naive", 5, 0)])
    c.pop("paired")
    assert report.ratio(c, c["rows"][0], c["rows"][1]) == (0.5, "medians")
    status, ev = report.case_target(c)
    assert status == "gap" and "0.50x (ratio of medians)" in ev


def test_floor_and_step_targets_with_and_without_the_frozen_case():
    plan = {"path": "keep", "chunk_rows": 256}
    fwd = _case("linear_logprobs.fwd", [_row("fastalign[torch]", "fastalign", 11, 0, plan)], [],
                floor={"ms": 9.0, "median_ms": 10.0, "what": "1 GEMM"})
    fb = _case("linear_logprobs.fwd_bwd", [_row("fastalign[torch]", "fastalign", 40, 0, plan)], [],
               floor={"ms": 25.0, "median_ms": 30.0, "what": "3 GEMMs"})
    dpo = _case("dpo_step", [_row("fastalign trainer step, fused ops on (linear_dpo_loss)", "fastalign", 10, 0),
                             _row("fastalign trainer step, fused ops off (logits)", "fastalign", 12, 0),
                             _row("plain PyTorch", "naive", 13, 0), _row("TRL DPOTrainer step", "trl", 11, 0)],
                [_pair("fastalign trainer step, fused ops on (linear_dpo_loss)", "plain PyTorch", 1.25),
                 _pair("fastalign trainer step, fused ops on (linear_dpo_loss)", "TRL DPOTrainer step", 1.05)],
                params={"model": "tiny-llama", "pairs": 2, "T": 128, "dtype": "float32"})
    got = report.issue11_targets(_run([fwd, fb, dpo]))
    status, ev = _status(got, "linear_logprobs.fwd (N=512 D=128 V=8000 float32) within 1.2x")
    assert status == "met" and "1.10x the floor" in ev and "path=keep, chunk_rows=256" in ev  # 11 / 10
    status, ev = _status(got, "linear_logprobs.fwd_bwd (N=512 D=128 V=8000 float32) within 1.25x")
    assert status == "gap" and "1.33x the floor" in ev  # 40 / 30
    assert "Cause: the floor is the GEMMs alone" in ev and "2 D = 256 flops" in ev
    assert _status(got, "linear_logprobs.fwd_bwd_frozen")[0] == "not measured"
    status, ev = _status(got, "e2e dpo_step")
    assert status == "gap" and "Short of 1.1x: TRL DPOTrainer step 1.05x" in ev and "plain PyTorch 1.25x" in ev
    # the gap names where the time goes: the trainer step with the fused head off against plain PyTorch (not in the
    # paired table here, so the ratio of medians 13 / 12)
    assert "fused ops off: plain / it 1.08x (ratio of medians)" in ev
    assert _status(got, "e2e grpo_step")[0] == "not measured"
    frozen = _case("linear_logprobs.fwd_bwd_frozen", [_row("fastalign[torch]", "fastalign", 20, 0)], [],
                   floor={"ms": 15.0, "median_ms": 17.0, "what": "2 GEMMs"})
    got = report.issue11_targets(_run([frozen]))
    status, ev = _status(got, "linear_logprobs.fwd_bwd_frozen (N=512 D=128 V=8000 float32) within")
    assert status == "met" and "1.18x the floor" in ev  # 20 / 17


def test_floor_target_uses_the_paired_per_round_ratio_when_the_floor_ran_in_the_rounds():
    fwd = _case("linear_logprobs.fwd", [_row("fastalign[torch]", "fastalign", 13, 0)], [],
                floor={"ms": 9.0, "median_ms": 10.0, "what": "1 GEMM", "rounds_median_ms": 11.0,
                       "paired": {"fastalign[torch]": {"median": 1.15, "p20": 1.1, "p80": 1.2, "rounds": 9}}})
    status, ev = _status(report.issue11_targets(_run([fwd])), "linear_logprobs.fwd (N=512 D=128 V=8000 float32) within")
    # 13 / 10 = 1.3 by medians would be a gap; the paired median 1.15 is within 1.2
    assert status == "met" and "1.15x the floor" in ev and "median of 9 paired per-round ratios" in ev


def test_a_gap_in_a_wrapped_trainer_step_names_the_trainers_own_share():
    fa_row = "TRL + fastalign.integrations.trl"
    rows = [_row("TRL default (DPOTrainer step)", "trl", 100.0, 200 * MiB), _row(fa_row, "fastalign", 55.0, 70 * MiB),
            _row("plain PyTorch", "naive", 50.0, 70 * MiB)]
    case = _case("trl_dpo_step", rows, [_pair(fa_row, "TRL default (DPOTrainer step)", 1.8),
                                        _pair(fa_row, "plain PyTorch", 0.9)])
    status, ev = report.case_target(case)
    assert status == "gap" and "behind plain PyTorch (other / fastalign 0.90x)" in ev
    # 100 / 50 by medians; the head's gain is the paired ratio against the trainer's default step
    assert "its default step takes 2.00x plain PyTorch's time here (medians)" in ev and "makes it 1.80x faster" in ev
    status, ev = report.case_target(_case("trl_dpo_step", rows, [_pair(fa_row, "TRL default (DPOTrainer step)", 1.8),
                                                                 _pair(fa_row, "plain PyTorch", 1.1)]))
    assert status == "met" and "Cause" not in ev


# ------------------------------------------------------------------------------------- GPU-shape estimates

def test_gpu_estimates_at_the_assumed_rate_without_a_gpu_run():
    est = {e["path"]: e for e in report.gpu_estimates([_run([])])}
    rate = 0.75 * 989.4e12
    flops = 2 * 32768 * 3584 * 151936
    assert {k: e["gemms"] for k, e in est.items()} == {
        "forward only (scoring)": 1, "keep, trainable weight": 3, "keep, frozen weight": 2,
        "recompute, trainable weight": 4, "recompute, frozen weight": 3}
    assert est["keep, trainable weight"]["ms"] == pytest.approx(1000 * 3 * flops / rate)
    assert est["keep, trainable weight"]["ms"] == pytest.approx(144.3, abs=0.1)
    assert not est["keep, frozen weight"]["measured_rate"] and "assumed" in est["keep, frozen weight"]["source"]


def test_gpu_estimates_use_the_cards_measured_gemm_floor():
    gpu_shape = {"N": 32768, "D": 3584, "V": 151936, "dtype": "bfloat16"}
    fwd = _case("linear_logprobs.fwd", [_row("fastalign[triton]", "fastalign", 56, 0)], [],
                floor={"ms": 51.0, "median_ms": 52.0, "what": "1 GEMM"}, params=gpu_shape)
    est = {e["path"]: e for e in report.gpu_estimates([_run([]), _run([fwd], cuda=True)])}
    assert est["keep, frozen weight"]["ms"] == pytest.approx(102.0)  # 2 GEMMs at 51 ms each
    assert est["recompute, trainable weight"]["ms"] == pytest.approx(204.0)
    assert est["keep, frozen weight"]["measured_rate"] and "NVIDIA H200" in est["keep, frozen weight"]["source"]
    text = "\n".join(report.gpu_estimate_section([_run([fwd], cuda=True)]))
    assert "| keep, trainable weight | 3 | logits, dh, dW | 153 |" in text
    assert "measured linear_logprobs.fwd: fastalign[triton] 56" in text


# ------------------------------------------------------------------------------------------------ rendering

def test_report_renders_a_new_run_with_load_paired_ratios_and_head_plans():
    fa = _row("fastalign[torch]", "fastalign", 10, MiB, {"path": "recompute", "chunk_rows": 512})
    c = _case("linear_logprobs.fwd_bwd", [fa, _row("naive", "naive", 12, 9 * MiB)],
              [_pair("fastalign[torch]", "naive", 1.2)], floor={"ms": 5.0, "median_ms": 6.0, "what": "3 GEMMs"})
    text = report.render([_run([c])], sources=["x.json"])
    assert "machine load: load average (1 min) 1.20 at the start, 2.40 at the end" in text
    assert "| linear_logprobs.fwd_bwd | N=512 D=128 V=8000 float32 | 10.0 |" in text and "| 1.20x |" in text
    assert "head plan: path=recompute, chunk_rows=512" in text
    assert "other / fastalign[torch], median of per-round ratios (p20–p80): naive 1.20x (1.20–1.20)" in text
    assert "### Targets of issue #11 (this run)" in text and "## Head paths at the GPU shape" in text
    assert "5 interleaved timing rounds" in text


@pytest.mark.parametrize("path", ["tests/benchmarks/data/schema1-cpu.json"])  # a CPU run of the first schema, kept
def test_report_still_renders_the_committed_schema_1_runs(path):
    run = json.loads((ROOT / path).read_text())
    text = report.render([run], sources=[path])
    assert "machine load: not recorded (schema 1 run)" in text
    assert "(m) |" in text  # ratios of medians, marked
    assert "### Targets of issue #11 (this run)" in text
    readme = report.readme_section([run])
    assert "How the ratios are computed" in readme and "How to read the load" in readme


def test_extra_sections_hook_reads_an_optional_module(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("fastalign.benchmarks.report_hook_test")
    mod.sections = lambda run: ["### Generation", "", f"{len(run['cases'])} cases"]
    monkeypatch.setitem(sys.modules, "fastalign.benchmarks.report_hook_test", mod)
    monkeypatch.setitem(sys.modules, "benchmarks.report_hook_test", mod)
    monkeypatch.setattr(report, "EXTRA_SECTION_MODULES", ("report_hook_test", "no_such_module_here"))
    assert report.extra_sections(_run([])) == ["### Generation", "", "0 cases"]
