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
