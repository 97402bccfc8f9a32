"""The feedback tools against a real vLLM OpenAI server on loopback (the session's ``vllm_server``,
tests/conftest.py: the tiny head_dim-64 Llama, started once and shared with tests/train/test_vllm.py): verdict
probabilities from the server's top log-probs equal the HF model's own, and ``fastalign cai label`` and
``fastalign judge pairwise`` run end to end through ``--generation-backend openai``. Marked ``vllm``: run by the
vLLM stage of .ci/run, skipped where vLLM is not installed."""
import json

import pytest
import torch

from fastalign import cli
from fastalign.feedback.engine import load_text_model

pytestmark = pytest.mark.vllm

ATOL = 1e-4  # the fp32 engine against the fp32 HF forward: ~1e-6 apart in practice
CONVERSATIONS = [
    [{"role": "user", "content": "Which reply is better? Answer A or B."}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "an answer of a few words"},
     {"role": "user", "content": "Is it good? A for yes, B for no."}],
]


def _http(url, model_dir, vocab):
    # --top-logprobs the whole vocabulary (the server allows it: --max-logprobs in tests/conftest.py), so every
    # verdict is read from log-probs
    return ["--generation-backend", "openai", "--base-url", url, "--model", str(model_dir),
            "--top-logprobs", str(vocab), "--request-retries", "1", "--request-timeout", "120"]


def _run(capsys, argv) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cai_label_and_judge_pairwise_against_vllm_serve(vllm_server, vllm_model_dir, tmp_path, capsys):
    # the choice-token probabilities the server reports are the model's own (the HF scorer's hand computation
    # is checked against the logits in test_engine.py)
    hf = load_text_model(vllm_model_dir, device="cpu", dtype="float32")
    vocab = len(hf.tokenizer)
    served = load_text_model(vllm_model_dir, backend="openai",
                             backend_options={"base_url": vllm_server, "top_logprobs": vocab})
    assert served.name == f"{vllm_server}#tiny"
    got, want = served.choice_probs(CONVERSATIONS, ["A", "B", "C"]), hf.choice_probs(CONVERSATIONS, ["A", "B", "C"])
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.mass, want.mass, rtol=1e-3, atol=0)

    http = _http(vllm_server, vllm_model_dir, vocab)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("2+2?", "Name a colour.", "Why?")))
    out = tmp_path / "prefs.jsonl"
    label = ["cai", "label", "--prompts", str(prompts), "--out", str(out), "--few-shot", "0",
             "--max-new-tokens", "8", "--principles-per-pair", "1", "--seed", "3", *http]
    summary = _run(capsys, label)
    assert summary["label_method"] == "logprobs" and summary["feedback_model"] == f"{vllm_server}#tiny"
    assert summary["processed"] == 3 and summary["failed_votes"] == 0
    rows = _jsonl(out)
    assert summary["kept_pairs"] == len(rows) and len(rows) + sum(summary["rejected"].values()) == 3
    for r in rows:
        assert 0.5 <= r["label"] <= 1 and r["chosen"] != r["rejected"] and r["label_method"] == "logprobs"
        part = r["label_parts"][0]
        assert part["p"] == pytest.approx((part["p_chosen_first"] + part["p_chosen_second"]) / 2)
    # seeded server sampling: a rerun into a fresh file writes the same rows
    again = tmp_path / "again.jsonl"
    _run(capsys, [*label[:label.index("--out")], "--out", str(again), *label[label.index("--out") + 2:]])
    assert _jsonl(again) == rows

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, prefix in ((a, "first"), (b, "second")):
        path.write_text("".join(json.dumps({"id": i, "prompt": f"Q{i}?", "completion": f"{prefix} answer {i}",
                                            "model": prefix}) + "\n" for i in range(3)))
    pairwise = ["judge", "pairwise", "--a", str(a), "--b", str(b), "--bootstrap", "50"]
    via_server = _run(capsys, [*pairwise, "--out-dir", str(tmp_path / "http"), *http])
    via_hf = _run(capsys, [*pairwise, "--out-dir", str(tmp_path / "hf"), "--model", str(vllm_model_dir),
                           "--dtype", "float32", "--device", "cpu"])
    assert via_server["method"] == via_hf["method"] == "logprobs" and via_server["judge"] == f"{vllm_server}#tiny"
    assert via_server["n"] == via_hf["n"] == 3
    for x, y in zip(_jsonl(tmp_path / "http" / "verdicts.jsonl"), _jsonl(tmp_path / "hf" / "verdicts.jsonl")):
        for ox, oy in zip(x["orders"], y["orders"]):
            assert ox["probs"] == pytest.approx(oy["probs"], abs=ATOL)
    assert (tmp_path / "http" / "summary.json").exists() and (tmp_path / "http" / "chart.png").exists()


def test_verdict_probabilities_from_an_in_process_vllm_engine(vllm_model_dir):
    hf = load_text_model(vllm_model_dir, device="cpu", dtype="float32")
    engine = load_text_model(vllm_model_dir, backend="vllm", dtype="float32", max_prompt_length=256,
                             backend_options={"vllm_kv_cache_gb": 1 / 16, "vllm_enforce_eager": True,
                                              "top_logprobs": len(hf.tokenizer), "max_model_len": 512})
    try:
        assert engine.scorer is engine.backend
        got, want = engine.choice_probs(CONVERSATIONS, ["A", "B", "C"]), hf.choice_probs(CONVERSATIONS, ["A", "B", "C"])
        torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=ATOL)
        torch.testing.assert_close(got.mass, want.mass, rtol=1e-3, atol=0)
        engine.backend.top_logprobs = 1  # only the most likely next token listed: the labels are unknown
        assert torch.isnan(engine.choice_probs(CONVERSATIONS, ["A", "B"]).probs).all()
    finally:
        engine.backend.close()
