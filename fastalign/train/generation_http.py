"""An OpenAI-compatible completions server as a generation backend (``--generation-backend openai --base-url URL``).

    backend = OpenAIGenerationBackend("http://127.0.0.1:8000/v1", eos_token_id=tok.eos_token_id)
    out = backend.generate(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7, n=4))
    out.token_ids, out.logprobs, out.truncated

Prompts go as token ids (the completions endpoint takes ``"prompt": [[ids], ...]``), so the server sees exactly the
tokens the trainer scores, with no chat template or re-tokenization in between. Completion ids and their sampled
log-probs come back where the server gives them: vLLM's ``return_token_ids`` (or ``return_tokens_as_token_ids``
in the log-probs), else, with a ``tokenizer``, the returned text re-encoded (log-probs then dropped: they no longer
line up with the ids). vLLM and SGLang take the ``top_k`` and ``stop_token_ids`` extensions; other servers ignore
unknown fields.

``next_token_logprobs(prompt_ids, token_ids)`` scores given next tokens (the verdict labels of the AI-feedback tools,
``fastalign.feedback``): one token is requested per prompt with ``logprobs=top_logprobs``, and each asked token's
log-prob is read from the server's top list of the first position (NaN where the token is not in that list: the
server says nothing about it, and the caller falls back to a parsed-text verdict).

Generation only: the server's weights do not follow the policy. ``sync_weights`` raises unless
``allow_stale_weights`` (off-policy sampling from a fixed server, which ``--sampler-is-cap`` can correct for).
Standard library only (urllib): requests of ``batch_size`` prompts run on ``max_workers`` threads; a request that
fails to connect, times out or gets a 408/429/5xx is retried ``retries`` times with exponential backoff.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import nn

from fastalign.train.generation import Completions, SamplingParams

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_TOKEN_ID_PREFIX = "token_id:"


class ServerUnavailable(ConnectionError):
    """The server could not be reached, or kept failing, after every retry."""


class OpenAIGenerationBackend:
    """Completions from an OpenAI-compatible HTTP server (``vllm serve``, SGLang, TGI, llama.cpp's server).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/completions`` and ``/models`` are under it).
        eos_token_id: ids generation stops at (sent as ``stop_token_ids``); None: the server's own EOS.
        model: the served model name; None: the first one ``GET /models`` lists.
        batch_size: prompts per request; None: all in one request.
        timeout: seconds per request (connect + response); retries: further attempts of a failed request;
        backoff: seconds before the first retry, doubled each time.
        max_workers: requests in flight at once.
        allow_stale_weights: make ``sync_weights`` a no-op instead of an error.
        tokenizer: re-encodes the returned text for servers that give no token ids.
        api_key: sent as a bearer token; None: ``$OPENAI_API_KEY`` when set.
        top_logprobs: how many top next tokens ``next_token_logprobs`` asks the server for (vLLM allows 20 unless
            started with ``--max-logprobs``; OpenAI's API 20).
    """

    def __init__(self, base_url: str, *, eos_token_id: int | Sequence[int] | None = None, model: str | None = None,
                 batch_size: int | None = None, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 max_workers: int = 4, allow_stale_weights: bool = False, tokenizer=None, api_key: str | None = None,
                 top_logprobs: int = 20):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if timeout <= 0 or retries < 0 or max_workers < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("timeout must be > 0, retries >= 0, max_workers >= 1 and batch_size >= 1 (or None)")
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be >= 1, got {top_logprobs}")
        self.base_url = base_url.rstrip("/")
        if eos_token_id is None:
            self.eos_ids = []
        else:
            self.eos_ids = sorted({int(eos_token_id)} if isinstance(eos_token_id, int) else set(map(int, eos_token_id)))
        self.model, self.batch_size, self.timeout, self.retries = model, batch_size, timeout, retries
        self.backoff, self.max_workers, self.allow_stale_weights = backoff, max_workers, allow_stale_weights
        self.tokenizer, self.top_logprobs = tokenizer, top_logprobs
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    # -------------------------------------------------------------------------------------------------- HTTP
    def _request(self, path: str, body: dict | None = None) -> dict:
        """One JSON request with retries; the parsed response."""
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code not in _RETRY_STATUS:
                    raise RuntimeError(f"{url}: HTTP {exc.code}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"no answer within {self.timeout:g} s (--request-timeout)"
                else:
                    last = f"cannot connect ({reason})"
            except (socket.timeout, TimeoutError):
                last = f"no answer within {self.timeout:g} s (--request-timeout)"
            log.warning("%s: attempt %d of %d failed: %s", url, attempt + 1, self.retries + 1, last)
        raise ServerUnavailable(f"OpenAI-compatible server at {self.base_url} failed {self.retries + 1} attempt(s): "
                                f"{last}. Is it running and is --base-url right (e.g. `vllm serve MODEL --port "
                                "8000` -> http://127.0.0.1:8000/v1)?")

    def served_model(self) -> str:
        """The model name requests use: the given one, else the first the server lists."""
        if self.model is None:
            listed = self._request("/models").get("data") or []
            if not listed:
                raise RuntimeError(f"{self.base_url}/models lists no model; pass the name (--served-model)")
            self.model = listed[0]["id"]
        return self.model

    # ---------------------------------------------------------------------------------------------- generate
    def _body(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None) -> dict:
        greedy = sampling.greedy
        body = {"model": self.served_model(), "prompt": prompts, "max_tokens": sampling.max_new_tokens,
                "temperature": 0.0 if greedy else sampling.temperature, "top_p": 1.0 if greedy else sampling.top_p,
                "n": sampling.n, "logprobs": 1, "stream": False,
                "return_token_ids": True, "return_tokens_as_token_ids": True}  # vLLM: ids, not text pieces
        if sampling.top_k and not greedy:
            body["top_k"] = sampling.top_k
        if self.eos_ids:
            body["stop_token_ids"] = self.eos_ids
        if seed is not None:
            body["seed"] = seed
        return body

    def _parse_choice(self, choice: dict) -> tuple[list[int], list[float] | None, bool]:
        lp = choice.get("logprobs") or {}
        tokens, values = lp.get("tokens"), lp.get("token_logprobs")
        ids = choice.get("token_ids")
        if ids is None and tokens and all(str(t).startswith(_TOKEN_ID_PREFIX) for t in tokens):
            ids = [int(str(t)[len(_TOKEN_ID_PREFIX):]) for t in tokens]
        if ids is None:
            if self.tokenizer is None:
                raise RuntimeError(f"{self.base_url} returned text but no token ids; pass tokenizer= to re-encode "
                                   "the text (an approximation of what was sampled)")
            ids, values = self.tokenizer.encode(choice.get("text", ""), add_special_tokens=False), None
        ids = [int(t) for t in ids]
        logprobs = [float(v) for v in values] if values is not None and len(values) == len(ids) else None
        return ids, logprobs, choice.get("finish_reason") != "stop"

    def _generate_part(self, prompts: list[list[int]], sampling: SamplingParams, seed: int | None):
        response = self._request("/completions", self._body(prompts, sampling, seed))
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) * sampling.n:
            raise RuntimeError(f"{self.base_url}: {len(choices)} choices for {len(prompts)} prompts x n={sampling.n}")
        return [self._parse_choice(c) for c in choices]

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Completions:
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if any(not p for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        if sampling.seed is not None:
            # one request per prompt, seeded seed + i: a seed is per request, and one seed for a batch would give
            # every copy of a repeated prompt (a GRPO group) the same completion
            parts = [([p], sampling.seed + i) for i, p in enumerate(prompts)]
        else:
            step = self.batch_size or max(len(prompts), 1)
            parts = [(prompts[i:i + step], None) for i in range(0, len(prompts), step)]
        if not prompts:
            return Completions([], [], [])
        self.served_model()  # once, before the threads
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(parts))) as pool:
            results = list(pool.map(lambda part: self._generate_part(part[0], sampling, part[1]), parts))
        rows = [row for part in results for row in part]
        logprobs = [lp for _, lp, _ in rows]
        return Completions(token_ids=[ids for ids, _, _ in rows], truncated=[t for _, _, t in rows],
                           logprobs=logprobs if all(lp is not None for lp in logprobs) else None)

    # ------------------------------------------------------------------------------------ next-token scoring
    def _top_ids(self, top: dict) -> dict[int, float]:
        """The server's top list of one position as {token id: log-prob}: vLLM names tokens ``token_id:N``
        (``return_tokens_as_token_ids``); other servers name them by text, mapped back with the tokenizer."""
        out = {}
        for key, value in top.items():
            key = str(key)
            if key.startswith(_TOKEN_ID_PREFIX):
                out[int(key[len(_TOKEN_ID_PREFIX):])] = float(value)
            elif self.tokenizer is not None:
                ids = self.tokenizer.encode(key, add_special_tokens=False)
                if len(ids) == 1:
                    out.setdefault(ids[0], float(value))
            else:
                raise RuntimeError(f"{self.base_url} names its top log-probs by text ({key!r}); pass tokenizer= to "
                                   "map them to token ids")
        return out

    def _score_part(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        # temperature 1, no top-p/top-k: the listed log-probs are the model's own distribution (vLLM's
        # processed_logprobs equal the raw ones then)
        body = {"model": self.served_model(), "prompt": prompts, "max_tokens": 1, "temperature": 1.0,
                "top_p": 1.0, "n": 1, "logprobs": self.top_logprobs, "stream": False, "seed": 0,
                "return_tokens_as_token_ids": True}
        response = self._request("/completions", body)
        choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise RuntimeError(f"{self.base_url}: {len(choices)} choices for {len(prompts)} prompts")
        rows = []
        for choice in choices:
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
            if not tops or not isinstance(tops[0], dict):
                raise RuntimeError(f"{self.base_url} returned no top_logprobs (asked for {self.top_logprobs}); "
                                   "this server cannot score tokens: use verdicts from text")
            top = self._top_ids(tops[0])
            rows.append([top.get(t, math.nan) for t in token_ids])
        return rows

    def next_token_logprobs(self, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> torch.Tensor:
        """(B, K) float64: log p(token_ids[k] | prompt_ids[b]) from the server's top log-probs of the next token;
        NaN for a token outside the top ``top_logprobs``."""
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if any(not p for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        ids = [int(t) for t in token_ids]
        if not prompts:
            return torch.zeros(0, len(ids), dtype=torch.float64)
        self.served_model()
        step = self.batch_size or len(prompts)
        parts = [prompts[i:i + step] for i in range(0, len(prompts), step)]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(parts))) as pool:
            results = list(pool.map(lambda part: self._score_part(part, ids), parts))
        return torch.tensor([row for part in results for row in part], dtype=torch.float64)

    def sync_weights(self, model: nn.Module) -> None:
        if self.allow_stale_weights:
            return
        raise RuntimeError(f"the openai generation backend cannot update the weights of the server at "
                           f"{self.base_url}: it keeps sampling from its own. Use --generation-backend vllm for "
                           "on-policy training, or allow_stale_weights=True (--allow-stale-weights) to train "
                           "off-policy against the server's fixed weights")
