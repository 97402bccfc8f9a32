"""The benchmark runner's CI preset end to end (real CLI, tiny shapes), and the report built from its JSON.

No timing assertions: the checks are that every case ran every implementation it knows (or named why not), that
the implementations agree with the truth, and that JSON, markdown, PNG and the generated BENCHMARKS.md are valid.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastalign.benchmarks import report
from fastalign.benchmarks.agreement import agreement
from fastalign.benchmarks.runner import Case, CaseTimeout, Impl, Prepared, run_case, time_limit

ROOT = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "missing", "error", "timeout", "skipped"}
CASES = {"linear_logprobs.fwd_bwd", "linear_logprobs.fwd_bwd_frozen", "linear_logprobs.fwd",
         "dpo_loss.fused_from_hidden", "grpo_loss.fused_from_hidden", "gae", "ppo_policy_loss.fwd_bwd",
         "value_loss.fwd_bwd", "kl_penalty.fwd_bwd",
         "dpo_step", "grpo_step", "trl_dpo_step", "trl_grpo_step", "hf_sft_step"}


def _env():
    env = dict(os.environ)
    # conftest.py turns the Triton interpreter on for the kernel tests; the runner's CI preset stays on the
    # torch paths (the kernels have their own tests) so this stays well under a minute on 2 cores
    env.pop("TRITON_INTERPRET", None)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--preset", "ci", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_ci_preset_writes_valid_json_with_every_case(ci_run):
    out, _ = ci_run
    data = json.loads((out / "results.json").read_text())
    for key in ("date", "machine", "versions", "command", "preset", "cases", "timing_method", "memory_method"):
        assert key in data, key
    assert data["preset"] == "ci"
    assert data["machine"]["card"] == "CPU (no GPU)"
    assert {"torch", "triton", "trl", "liger_kernel", "cut_cross_entropy"} <= set(data["versions"])
    assert {c["case"] for c in data["cases"]} == CASES
    assert data["schema"] == 2 and "interleaved" in data["timing_order"]
    assert {"start", "end", "cpu_count", "torch_threads"} <= set(data["load"])
    for case in data["cases"]:
        assert case["rows"], case["case"]
        assert case["interleaved"] and case["rounds"] >= 1 and set(case["load"]) == {"start", "end"}
        ran = [r for r in case["rows"] if r["status"] == "ok"]
        if any(r["extra"]["family"] == "fastalign" for r in ran) and len(ran) > 1:
            assert case["paired"], case["case"]  # ratios of every fastalign row against every other that ran
        for row in case["rows"]:
            assert row["status"] in STATUSES
            if row["status"] == "ok":
                t = row["time"]
                assert t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["reps"] >= 1
                assert len(t["round_ms"]) == case["rounds"]
                assert row["memory"]["method"] == "cpu-rss-sampled"
            else:  # never silently skipped: a missing or failing implementation says why
                assert row["detail"], (case["case"], row["impl"])


def test_ci_preset_cross_check_agrees(ci_run):
    """Correctness before timing: every implementation that ran was compared with the truth and agrees."""
    out, _ = ci_run
    data = json.loads((out / "results.json").read_text())
    checked = 0
    for case in data["cases"]:
        if not case["checked"]:
            continue
        ran = [r for r in case["rows"] if r["status"] == "ok"]
        # the plain PyTorch baseline and fastalign's torch path always run on CPU
        assert any(r["extra"]["family"] == "fastalign" for r in ran), case["case"]
        assert any(r["extra"]["family"] in ("naive", "python-loop") for r in ran), case["case"]
        for r in ran:
            assert r["agrees"] is True, (case["case"], r["impl"], r["deviation"])
            assert all(math.isfinite(v) for v in r["deviation"].values())
            checked += 1
    assert checked >= 20


def test_ci_preset_markdown_and_png(ci_run):
    out, stdout = ci_run
    md = (out / "results.md").read_text()
    assert "not the GPU targets" in md and "| case | shape |" in md
    assert "linear_logprobs.fwd_bwd" in md and "dpo_step" in md
    pngs = list(out.glob("*.png"))
    assert pngs, "no scaling plot"
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| case | shape |" in stdout  # the headline table is printed


def test_report_builds_benchmarks_md_from_json(ci_run, tmp_path):
    out, _ = ci_run
    target = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "report", str(out / "results.json"), "--out",
                           str(target)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = target.read_text()
    data = json.loads((out / "results.json").read_text())
    assert text.startswith("# Benchmarks")
    assert "do not edit by hand" in text
    assert data["date"] in text and "CPU (no GPU)" in text
    assert "No GPU run is included here" in text and "not the GPU targets" in text
    assert "### Targets" in text and "| target | status | evidence |" in text
    assert "Headline table (for the README)" in proc.stdout
    linked = [line for line in text.splitlines() if line.startswith("![scaling](")]
    assert linked and (target.parent / linked[0][len("![scaling]("):-1]).is_file()


# ------------------------------------------------------------------------------------------- runner pieces

def _case(impls, truth=None):
    return Case(suite="ops", name="toy", params={"N": 3}, device=torch.device("cpu"), dtype=torch.float32,
                make_inputs=lambda: {"x": torch.arange(3.0)}, truth=truth, impls=impls)


def test_missing_and_failing_implementations_are_reported_not_skipped():
    def broken(inputs):
        raise RuntimeError("kernel exploded")

    def good(inputs):
        return Prepared(lambda: {"y": inputs["x"] * 2})

    def wrong(inputs):
        return Prepared(lambda: {"y": inputs["x"] * 2 + 1})

    res = run_case(_case([Impl("absent", "liger", missing="ModuleNotFoundError: liger_kernel"),
                          Impl("broken", "fastalign", broken), Impl("good", "naive", good, is_baseline=True),
                          Impl("wrong", "fastalign", wrong)],
                         truth=lambda x: {"y": x["x"] * 2}), budget_s=0.01, impl_timeout_s=30, log=lambda *a: None)
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["absent"]["status"] == "missing" and "liger_kernel" in rows["absent"]["detail"]
    assert rows["broken"]["status"] == "error" and "kernel exploded" in rows["broken"]["detail"]
    assert rows["good"]["status"] == "ok" and rows["good"]["agrees"] is True
    assert rows["wrong"]["status"] == "ok" and rows["wrong"]["agrees"] is False
    assert rows["wrong"]["deviation"]["y"] == pytest.approx(1.0)


def test_agreement_rule_uses_same_dtype_baseline_and_catches_nan():
    truth = {"y": torch.tensor([1.0, 2.0])}
    devs, ok = agreement({"y": torch.tensor([1.0, 2.3])}, truth, {"y": 0.2}, torch.bfloat16)
    assert ok and devs["y"] == pytest.approx(0.3, abs=1e-6)  # 0.3 <= 2 * 0.2 + 1e-2 * 2
    _, ok = agreement({"y": torch.tensor([1.0, 2.3])}, truth, {"y": 0.01}, torch.bfloat16)
    assert not ok
    _, ok = agreement({"y": torch.tensor([1.0, float("nan")])}, truth, None, torch.float32)
    assert not ok


def test_time_limit_interrupts_a_slow_implementation():
    import time

    with pytest.raises(CaseTimeout):
        with time_limit(0.2):
            time.sleep(2)


def test_targets_are_judged_only_on_gpu_runs():
    def row(impl, family, ms, mem):
        return {"impl": impl, "status": "ok", "time": {"median_ms": ms}, "extra": {"family": family},
                "memory": {"peak_above_inputs_bytes": mem, "method": "cuda-max_memory_allocated"}}

    case = {"case": "linear_logprobs.fwd_bwd", "params": {"N": 32768, "D": 3584, "V": 151936},
            "rows": [row("fastalign[triton]", "fastalign", 200.0, 2**30),
                     row("TRL chunked log-prob from hidden", "trl", 234.0, 4 * 2**30),
                     row("CCE (default gradient filter)", "cce", 190.0, 2**30)]}
    gpu = {"machine": {"cuda": True, "card": "NVIDIA H200"}, "cases": [case]}
    got = {name: status for name, status, _ in report.targets(gpu)}
    assert got["linear_logprobs fwd+bwd (32768x3584x151936 bf16) <= TRL chunked time, <= 1.5 GiB"] == "met"
    assert got["linear_logprobs fwd+bwd: faster than CCE default (approximate grads) with exact grads"] == "missed"
    assert got["GAE 512x2048 < 20 us and >= 5000x the Python loop"] == "open"  # not measured in this run
    cpu = {"machine": {"cuda": False, "card": "CPU (no GPU)"}, "cases": [case]}
    assert all(s == "open" for n, s, _ in report.targets(cpu) if not n.startswith("CPU"))


def test_readme_update_touches_only_the_benchmark_section(ci_run, tmp_path):
    out, _ = ci_run
    data = json.loads((out / "results.json").read_text())
    before, after = "# title\n\nintro\n\n", "\n\n## Next section\nkept as is\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + report.README_BEGIN + "\nold table\n" + report.README_END + after)
    report.update_readme(readme, [data])
    text = readme.read_text()
    assert text.startswith(before + report.README_BEGIN) and text.endswith(report.README_END + after)
    assert "old table" not in text and "| case | shape |" in text and "not the GPU targets" in text
    assert "every GPU target in docs/architecture.md (*Targets*) is open" in text


def test_gpu_preset_builds_design_shapes_without_a_gpu():
    """The GPU preset's cases are only described until run (inputs are built lazily): check they are the
    shapes of the GPU targets in docs/architecture.md (*Targets*), with every peer listed, without touching a
    device."""
    from fastalign.benchmarks import __main__ as cli
    from fastalign.benchmarks.presets import PRESETS

    args = cli._run_parser().parse_args([])
    specs = cli._specs(args, PRESETS["gpu"], None)
    cases = cli._build_cases(cli._select(args), specs, torch.device("cuda"), compile_peers=True)
    shapes = {(c.name, tuple(sorted(c.params.items()))) for c in cases}
    assert ("linear_logprobs.fwd_bwd", (("D", 3584), ("N", 32768), ("V", 151936), ("dtype", "bfloat16"),
                                        ("head", "qwen2.5-7b"))) in shapes
    assert any(c.name == "linear_logprobs.fwd" and c.params["N"] == 8192 and c.params["V"] == 128256 for c in cases)
    assert any(c.name == "dpo_loss.fused_from_hidden" and c.params["pairs"] == 8 and c.params["T"] == 2048
               for c in cases)
    assert {(c.params["B"], c.params["T"]) for c in cases if c.name == "gae"} == {(512, 2048), (1024, 4096)}
    assert any(c.name == "dpo_step" and c.params["model"] == "qwen2.5-0.5b" for c in cases)
    sweep = [c for c in cases if not c.headline]
    assert len(sweep) >= 4 and cases[-len(sweep):] == sweep  # the sweep runs last (cut first by the deadline)
    lp = next(c for c in cases if c.name == "linear_logprobs.fwd_bwd")
    names = {i.name for i in lp.impls}
    assert {"TRL chunked log-prob from hidden", "Liger fused linear CE (reduction=none)",
            "CCE (default gradient filter)", "CCE exact (filter_eps=None)", "fastalign[triton]"} <= names


def test_custom_shape_flags_replace_the_preset_shapes():
    from fastalign.benchmarks import __main__ as cli
    from fastalign.benchmarks.presets import DTYPES, PRESETS

    argv = ["--cases", "linear_logprobs,gae", "--n", "4096", "--d", "1024", "--v", "32000", "--dtype", "bf16",
            "--b", "8", "--t", "100"]
    args = cli._run_parser().parse_args(argv)
    specs = cli._specs(args, PRESETS["cpu"], DTYPES[args.dtype])
    cases = cli._build_cases(cli._select(args), specs, torch.device("cpu"), compile_peers=False)
    assert {(c.name, c.params.get("N"), c.params.get("D"), c.params.get("V"), c.params["dtype"]) for c in cases
            if c.name.startswith("linear")} == {("linear_logprobs.fwd_bwd", 4096, 1024, 32000, "bfloat16"),
                                                 ("linear_logprobs.fwd_bwd_frozen", 4096, 1024, 32000, "bfloat16"),
                                                 ("linear_logprobs.fwd", 4096, 1024, 32000, "bfloat16")}
    assert [(c.params["B"], c.params["T"]) for c in cases if c.name == "gae"] == [(8, 100)]


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "benchmarks/fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / script).read_text()
    if script.endswith("gpu_check.sh"):  # one command: carried wheels, GPU tests, extension, the gpu preset
        for needle in (".whl/*.whl", "-m gpu", "fastalign.ext build", "--preset gpu", "--deadline"):
            assert needle in text, needle


def test_gpu_check_runs_the_config_sweep_and_its_stage_caps_fit_nine_minutes():
    import re

    text = (ROOT / "benchmarks/gpu_check.sh").read_text()
    assert "benchmarks.config_sweep" in text and "FASTALIGN_KERNEL_CONFIGS" in text
    caps = {name: int(value) for name, value in re.findall(r"^(T_\w+)=\$\{\w+:-(\d+)\}", text, flags=re.M)}
    assert set(caps) == {"T_TESTS", "T_EXT", "T_SWEEP", "T_BENCH"}, caps
    # the stage caps plus a minute for the machine, the install and the report stay under 9 minutes
    assert sum(caps.values()) + 60 < 9 * 60, caps
