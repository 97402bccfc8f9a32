"""benchmarks/generation.py runs the GRPO rollout + step end to end and reports a missing vLLM with its error."""
import json
import sys

from benchmarks import generation as gen_bench


def test_generation_benchmark_runs_and_reports_missing_vllm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # missing, whether or not it is installed here
    argv = ["--out", str(tmp_path), "--steps", "1", "--prompts", "1", "--group", "2", "--max-new-tokens", "4"]
    assert gen_bench.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    hf, vllm = data["results"]
    assert hf["backend"] == "hf" and hf["status"] == "ok" and hf["tokens_per_step"] > 0
    assert hf["gen_tokens_per_s"] > 0 and hf["step_tokens_per_s"] > 0 and "sampler_logprob_diff_max" not in hf
    assert vllm == {"backend": "vllm", "status": "missing", "detail": vllm["detail"]}
    assert vllm["detail"].startswith("ImportError")
    assert "| vllm | missing" in capsys.readouterr().out
    # what the run records, and its rows in the report (the kernel report leaves it alone)
    assert data["schema"] == "fastalign-generation-bench/1" and data["environment"]["python"] == sys.executable
    assert len(data["load_average"]["before"]) == 3 and data["command"].endswith(" ".join(argv))
    from benchmarks import report, report_generation

    kernel_runs, generation_runs = report_generation.split([data])
    assert kernel_runs == [] and generation_runs == [data]
    text = report.render([data], sources=["gen.json"])
    assert "## Generation: a GRPO rollout + step, HF `generate` vs vLLM" in text
    assert f"- environment: `{sys.prefix}`" in text and "- load average (1, 5, 15 min) before: [" in text
    row = next(line for line in text.splitlines() if line.startswith("| HF `generate`"))
    assert f"| {hf['tokens_per_step']:,.0f} |" in row and "| none |" in row  # no weight sync for HF
    assert "| vLLM (in-process, colocated) | **missing**: ImportError" in text
    assert not report.headline_table([data]).strip() and "## Generation" not in report.readme_section([data])
