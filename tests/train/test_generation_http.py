"""The OpenAI-compatible HTTP backend against a stdlib fake server on loopback: the request it sends (token-id
prompts, sampling fields), the completions it parses (token ids, log-probs, truncation, prompt-major order with
n), retries, timeouts, the error when no server listens, and the refused weight sync. Runs without vLLM."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastalign.train import generation
from fastalign.train.generation_http import OpenAIGenerationBackend, ServerUnavailable

EOS = 2


class FakeServer:
    """A completions endpoint on 127.0.0.1 that answers each prompt with ids [prompt[-1] + 1, ..., EOS] and records
    the bodies it got. ``fail_next`` answers that many requests with a 503 first; ``hold`` makes a request wait
    until released (a server that stopped answering)."""

    def __init__(self):
        self.bodies, self.fail_next, self.hold = [], 0, threading.Event()
        self.hold.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake-model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                owner.hold.wait(timeout=30)
                if owner.fail_next:
                    owner.fail_next -= 1
                    return self._send(503, {"error": "busy"})
                if body["prompt"] == [[99]]:
                    return self._send(400, {"error": "prompt too long"})
                self._send(200, {"choices": owner.choices(body)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def choices(body):
        out = []
        for p, prompt in enumerate(body["prompt"]):
            for j in range(body["n"]):
                length = (prompt[-1] + j) % 4  # 0..3 tokens before EOS; 3 runs into max_tokens
                ids = [prompt[-1] + 1 + k for k in range(length)] + [EOS]
                stop = len(ids) <= body["max_tokens"]
                ids = ids[:body["max_tokens"]]
                tokens = [f"token_id:{t}" for t in ids]
                out.append({"index": p * body["n"] + j, "text": "", "finish_reason": "stop" if stop else "length",
                            "logprobs": {"tokens": tokens, "token_logprobs": [-0.5 - 0.1 * k for k in range(len(ids))]}})
        return out[::-1]  # out of order: the client must sort by index

    def close(self):
        self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def _backend(url, **kw):
    return OpenAIGenerationBackend(url, eos_token_id=EOS, backoff=0.0, **{"timeout": 5.0, **kw})


def test_token_id_prompts_and_parsed_completions(server):
    sampling = generation.SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, n=2)
    out = _backend(server.url).generate([[5, 10], [7]], sampling)
    body = server.bodies[0]
    assert body["prompt"] == [[5, 10], [7]] and body["model"] == "fake-model"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["n"]) == (3, 0.7, 0.9, 5, 2)
    assert body["stop_token_ids"] == [EOS] and body["logprobs"] == 1 and "seed" not in body
    # prompt-major rows: prompt 0's two completions, then prompt 1's
    assert out.token_ids == [[11, 12, EOS], [11, 12, 13], [8, 9, 10], [EOS]]
    assert out.truncated == [False, True, True, False]
    assert out.logprobs[0] == pytest.approx([-0.5, -0.6, -0.7]) and out.logprobs[3] == pytest.approx([-0.5])


def test_batches_and_seeds(server):
    prompts = [[4], [5], [6]]
    out = _backend(server.url, batch_size=2).generate(prompts, generation.SamplingParams(max_new_tokens=4))
    assert sorted(len(b["prompt"]) for b in server.bodies) == [1, 2] and len(out.token_ids) == 3
    server.bodies.clear()
    # a seed is per request: each prompt goes alone with seed + i, so a repeated prompt's copies can differ
    _backend(server.url).generate(prompts, generation.SamplingParams(max_new_tokens=4, seed=10, greedy=True))
    assert sorted((b["prompt"][0][0], b["seed"]) for b in server.bodies) == [(4, 10), (5, 11), (6, 12)]
    assert all(b["temperature"] == 0.0 and "top_k" not in b for b in server.bodies)


def test_retries_after_server_errors(server):
    server.fail_next = 2
    out = _backend(server.url, retries=2).generate([[1]], generation.SamplingParams(max_new_tokens=4))
    assert out.token_ids == [[2, EOS]] and len(server.bodies) == 3
    server.fail_next = 5
    with pytest.raises(ServerUnavailable, match="3 attempt.*HTTP 503"):
        _backend(server.url, retries=2).generate([[1]], generation.SamplingParams(max_new_tokens=4))


def test_client_errors_are_not_retried(server):
    with pytest.raises(RuntimeError, match="HTTP 400.*prompt too long"):
        _backend(server.url, retries=3).generate([[99]], generation.SamplingParams())
    assert len(server.bodies) == 1


def test_timeout_is_retried_then_reported(server):
    server.hold.clear()  # the server accepts the request and never answers
    with pytest.raises(ServerUnavailable, match="2 attempt.*no answer within 0.2 s"):
        _backend(server.url, timeout=0.2, retries=1, model="m").generate([[1]], generation.SamplingParams())
    assert len(server.bodies) == 2


def test_absent_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        with pytest.raises(ServerUnavailable, match=r"cannot connect.*Is it running and is --base-url right"):
            _backend(url, retries=1, model="m").generate([[1]], generation.SamplingParams())


def test_weight_sync_is_refused_unless_stale_weights_are_allowed(server):
    with pytest.raises(RuntimeError, match="cannot update the weights.*--allow-stale-weights"):
        _backend(server.url).sync_weights(None)
    _backend(server.url, allow_stale_weights=True).sync_weights(None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="--base-url"):
        OpenAIGenerationBackend("localhost:8000")
    with pytest.raises(ValueError, match="timeout"):
        OpenAIGenerationBackend("http://127.0.0.1:1/v1", timeout=0)


def test_text_only_servers_need_a_tokenizer(server, tiny_tokenizer):
    backend = _backend(server.url)
    text_only = {"index": 0, "text": "12", "finish_reason": "stop"}
    with pytest.raises(RuntimeError, match="no token ids; pass tokenizer="):
        backend._parse_choice(text_only)
    ids, logprobs, truncated = _backend(server.url, tokenizer=tiny_tokenizer)._parse_choice(text_only)
    assert tiny_tokenizer.decode(ids) == "12" and logprobs is None and not truncated


def test_next_token_scoring_needs_top_logprobs(server):
    # the fake answers like a server without log-prob support for the top list: a clear error, not a guess
    with pytest.raises(RuntimeError, match="returned no top_logprobs .asked for 5.*use verdicts from text"):
        _backend(server.url, top_logprobs=5).next_token_logprobs([[5], [6]], [7, 8])
    body = server.bodies[-1]
    assert body["max_tokens"] == 1 and body["logprobs"] == 5 and body["temperature"] == 1.0
    assert _backend(server.url).next_token_logprobs([], [7]).shape == (0, 1)
    with pytest.raises(ValueError, match="top_logprobs must be >= 1"):
        OpenAIGenerationBackend(server.url, top_logprobs=0)
