"""The feedback tools over the OpenAI-compatible HTTP backend, against a stdlib server on loopback that answers
from the tiny HF model itself (completions from its ``generate``, top log-probs from its forward): verdict
probabilities read from the server's ``top_logprobs`` equal the HF scorer's, a label outside the server's top list
falls back to a parsed-text verdict, ``cai label`` and ``judge pairwise`` run end to end through
``--generation-backend openai``, and the option and connection errors are one line. Runs without vLLM; the same
verbs against a real ``vllm serve`` are in tests/train/test_vllm.py."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastalign import cli
from fastalign.feedback.engine import HFChoiceScorer, TextModel, load_text_model
from fastalign.feedback.verdicts import ask
from fastalign.train import generation, models
from fastalign.train.generation_http import OpenAIGenerationBackend

CONVERSATIONS = [
    [{"role": "user", "content": "Which reply is better? Answer A or B."}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "an answer of a few words"},
     {"role": "user", "content": "Is it good? A for yes, B for no."}],
    [{"role": "user", "content": "A much longer question about weather, climate and the many words between them."}],
]


class ModelServer:
    """``/v1/models`` and ``/v1/completions`` (token-id prompts) answered by an HF model: a request for one token
    with ``logprobs`` N gets the N most likely next tokens (keyed ``token_id:ID`` when the request asks
    ``return_tokens_as_token_ids``, else by the token's text); others get ``generate``'s completions."""

    def __init__(self, model_dir):
        self.model = models.load_model(model_dir, dtype="float32").eval()
        self.tok = models.load_tokenizer(model_dir)
        self.hf = generation.HFGenerationBackend(self.model, pad_token_id=self.tok.pad_token_id,
                                                 eos_token_id=self.tok.eos_token_id)
        self.bodies, self.lock, owner = [], threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": "tiny-hf"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:  # one model, one request at a time
                    owner.bodies.append(body)
                    self._send({"choices": owner.answer(body)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @torch.no_grad()
    def answer(self, body):
        prompts = body["prompt"]
        if body["max_tokens"] == 1 and body.get("logprobs"):
            out = []
            for i, ids in enumerate(prompts):
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
                logp = torch.log_softmax(logits, -1)
                top = torch.topk(logp, body["logprobs"])
                by_id = body.get("return_tokens_as_token_ids")
                listed = {(f"token_id:{t}" if by_id else self.tok.decode([t])): v
                          for t, v in zip(top.indices.tolist(), top.values.tolist())}
                out.append({"index": i, "text": "", "finish_reason": "length",
                            "logprobs": {"top_logprobs": [listed]}})
            return out
        sampling = generation.SamplingParams(max_new_tokens=body["max_tokens"], greedy=body["temperature"] == 0,
                                             temperature=body["temperature"] or 1.0, top_p=body["top_p"],
                                             n=body["n"], seed=body.get("seed"))
        comps = self.hf.generate(prompts, sampling)
        return [{"index": i, "text": "", "token_ids": ids, "finish_reason": "length" if cut else "stop"}
                for i, (ids, cut) in enumerate(zip(comps.token_ids, comps.truncated))]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    fake = ModelServer(tiny_model_dir)
    yield fake
    fake.close()


def _http_model(server, tiny_model_dir, **kw):
    return load_text_model(tiny_model_dir, backend="openai",
                           backend_options={"base_url": server.url, "request_retries": 0, **kw})


def test_choice_probs_from_top_logprobs_equal_the_hf_scorer(server, tiny_model_dir):
    vocab = len(server.tok)
    http = _http_model(server, tiny_model_dir, top_logprobs=vocab)  # every token listed: exact
    assert http.name == f"{server.url}#tiny-hf" and http.scorer is http.backend
    hf = TextModel(server.hf, server.tok, name="hf", scorer=HFChoiceScorer(server.model, pad_token_id=0))
    labels = ["A", "B", "C"]
    got, want = http.choice_probs(CONVERSATIONS, labels), hf.choice_probs(CONVERSATIONS, labels)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.mass, want.mass, rtol=1e-4, atol=0)
    body = server.bodies[-1]
    assert body["max_tokens"] == 1 and body["logprobs"] == vocab and body["temperature"] == 1.0
    # a server that names its top tokens by text: mapped back through the tokenizer
    ids = [server.tok.convert_tokens_to_ids(x) for x in labels]
    by_text = OpenAIGenerationBackend(server.url, tokenizer=server.tok, top_logprobs=vocab)
    by_text._score_part = lambda part, tokens: _text_keyed(server, by_text, part, tokens)
    torch.testing.assert_close(by_text.next_token_logprobs([http.encode(c) for c in CONVERSATIONS], ids),
                               http.backend.next_token_logprobs([http.encode(c) for c in CONVERSATIONS], ids))


def _text_keyed(server, backend, part, tokens):
    body = {"prompt": part, "max_tokens": 1, "logprobs": backend.top_logprobs}  # no return_tokens_as_token_ids
    listed = [c["logprobs"]["top_logprobs"][0] for c in server.answer(body)]
    assert all(not str(k).startswith("token_id:") for top in listed for k in top)
    return [[backend._top_ids(top).get(t, float("nan")) for t in tokens] for top in listed]


def test_labels_outside_the_top_list_fall_back_to_text(server, tiny_model_dir):
    http = _http_model(server, tiny_model_dir, top_logprobs=1)  # only the most likely next token is listed
    probs = http.choice_probs(CONVERSATIONS, ["A", "B"]).probs
    assert torch.isnan(probs).all()  # the tiny model's top next token is neither label
    verdicts = ask(http, CONVERSATIONS, ["A", "B"], method="logprobs", parse=lambda t: None, max_new_tokens=4)
    # each went to a generated verdict (greedy, then the sampled retry), unparseable here: no probs, no mass
    assert all(v.label is None and v.probs is None and v.mass is None and v.attempts == 2 for v in verdicts)
    assert any(b["max_tokens"] == 4 for b in server.bodies)


def _run(capsys, argv) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cai_label_and_judge_pairwise_through_the_openai_backend(server, tiny_model_dir, tmp_path, capsys):
    http = ["--generation-backend", "openai", "--base-url", server.url, "--model", str(tiny_model_dir),
            "--top-logprobs", str(len(server.tok)), "--request-retries", "0"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("2+2?", "Name a colour.", "Why?")))
    out = tmp_path / "prefs.jsonl"
    summary = _run(capsys, ["cai", "label", "--prompts", str(prompts), "--out", str(out), "--few-shot", "0",
                            "--max-new-tokens", "8", "--principles-per-pair", "1", *http])
    assert summary["label_method"] == "logprobs" and summary["feedback_model"] == f"{server.url}#tiny-hf"
    assert summary["processed"] == 3 and summary["failed_votes"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["kept_pairs"] == len(rows) and len(rows) + sum(summary["rejected"].values()) >= 3
    for r in rows:
        assert 0.5 <= r["label"] <= 1 and r["label_parts"][0]["p"] is not None and r["chosen"] != r["rejected"]
    # the responses were sampled by the server from the plain-text prompt (chat_template auto, string prompts)
    sampled = [b for b in server.bodies if b["max_tokens"] == 8]
    assert sampled and all(b["seed"] is not None for b in sampled)
    assert server.tok.decode(sampled[0]["prompt"][0], skip_special_tokens=True) in {"2+2?", "Name a colour.", "Why?"}

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, prefix in ((a, "first"), (b, "second")):
        path.write_text("".join(json.dumps({"id": i, "prompt": f"Q{i}?", "completion": f"{prefix} answer {i}",
                                            "model": prefix}) + "\n" for i in range(3)))
    pairwise = ["judge", "pairwise", "--a", str(a), "--b", str(b), "--bootstrap", "50"]
    got = _run(capsys, [*pairwise, "--out-dir", str(tmp_path / "http"), *http])
    want = _run(capsys, [*pairwise, "--out-dir", str(tmp_path / "hf"), "--model", str(tiny_model_dir),
                         "--dtype", "float32", "--device", "cpu"])
    assert got["method"] == want["method"] == "logprobs" and got["judge"] == f"{server.url}#tiny-hf"
    assert got["n"] == want["n"] == 3 and got["win_rate_a"] == want["win_rate_a"]
    via_http = [json.loads(line) for line in (tmp_path / "http" / "verdicts.jsonl").read_text().splitlines()]
    via_hf = [json.loads(line) for line in (tmp_path / "hf" / "verdicts.jsonl").read_text().splitlines()]
    for x, y in zip(via_http, via_hf):
        assert x["winner"] == y["winner"]
        for ox, oy in zip(x["orders"], y["orders"]):
            assert ox["probs"] == pytest.approx(oy["probs"], abs=1e-5) and ox["verdict"] == oy["verdict"]


def _fails(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[fastalign] ")]
    assert len(err) == 1 and err[0].startswith("fastalign: error: "), err
    return err[0][len("fastalign: error: "):]


def test_openai_option_and_connection_errors(capsys, tmp_path, tiny_model_dir):
    assert "--generation-backend openai needs --base-url" in _fails(
        capsys, ["cai", "label", "--generation-backend", "openai"])
    assert "--base-url and --served-model are only used by --generation-backend openai" in _fails(
        capsys, ["cai", "revise", "--base-url", "http://127.0.0.1:1/v1"])
    assert "--policy with --generation-backend openai needs --policy-base-url" in _fails(
        capsys, ["cai", "label", "--generation-backend", "openai", "--base-url", "http://127.0.0.1:1/v1",
                 "--policy", "runs/sft/final"])
    with socket.socket() as s:  # bound, never listening: nothing answers
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        message = _fails(capsys, ["judge", "answer", "--generation-backend", "openai", "--base-url", url,
                                  "--model", str(tiny_model_dir), "--request-retries", "0",
                                  "--out", str(tmp_path / "answers.jsonl")])
    assert message.startswith(f"OpenAI-compatible server at {url} failed 1 attempt(s): cannot connect")
    assert "is --base-url right" in message
