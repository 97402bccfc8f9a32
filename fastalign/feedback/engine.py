"""A model behind the generation protocol, seen as text in and text out, plus choice-token scoring.

    TextModel(backend, tokenizer)            any GenerationBackend: HF, an in-process vLLM engine, an HTTP server
      .answer(prompts, sampling, seed=...)          -> [Generation(text, truncated)]   a data row's prompt
      .generate(conversations, sampling, seed=...)  -> [Generation(text, truncated)]   the stages' own prompts
      .choice_probs(conversations, labels)          -> ChoiceProbs(probs (B, K) float64, mass (B,) float64)

The backend only maps token ids to token ids (:class:`GenerationBackend`). Verdicts read from log-probs need a
second, optional capability, :class:`ChoiceScorer`: the log-probability of a few given next tokens after each
prompt. :class:`HFChoiceScorer` gets them from one forward pass of the HF model (the last position's logits
only, so no [B, T, V] tensor); a backend that implements ``next_token_logprobs`` itself is its own scorer:
``VLLMGenerationBackend`` and ``OpenAIGenerationBackend`` read them from the engine's / server's top log-probs
of the next token, NaN for a label outside that list, and such a verdict falls back to parsed text
(:func:`fastalign.feedback.verdicts.ask`). Without a scorer the stages generate a verdict and parse it.

Chat templates (``chat_template``), as the trainers: a data row's prompt (``answer``: the response that becomes a
training row's completion) is encoded exactly as ``fastalign train`` encodes a prompt-only row
(``data.chat_for``: ``auto`` renders message lists through the chat template and strings as plain text, ``on``
wraps strings as a user turn, ``off`` refuses message lists), so a response is sampled from the context it will
be trained in. The stages' own multi-turn prompts (critiques, revisions, comparisons, judging) go through the
template under ``auto`` when the tokenizer has one, else as ``User:`` / ``Assistant:`` blocks (always under
``off``; ``on`` requires a template).

Backends are built by name from :data:`BACKENDS` (``hf``, ``vllm``, ``openai``; ``register_backend(name,
factory)`` adds one); a factory takes the model directory (for ``openai``: where the tokenizer is) and returns
``(backend, tokenizer, scorer or None)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from fastalign.feedback.io import FeedbackError
from fastalign.train import batching, data, models

from fastalign.train.generation import Completions, GenerationBackend, HFGenerationBackend, SamplingParams
from fastalign.train.tiny import default_tiny_model_dir

__all__ = ["BACKENDS", "ChoiceProbs", "ChoiceScorer", "Completions", "Generation", "GenerationBackend",
           "HFChoiceScorer", "SamplingParams", "TextModel", "load_text_model", "register_backend"]


@runtime_checkable
class ChoiceScorer(Protocol):
    """Scores given next tokens: the optional capability behind log-prob verdicts."""

    def next_token_logprobs(self, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> torch.Tensor:
        """(B, K) float64: ``log p(token_ids[k] | prompt_ids[b])`` under the model's full next-token distribution."""
        ...


class HFChoiceScorer:
    """Next-token log-probs from a forward pass of a Hugging Face causal LM.

    Prompts are right-padded, so each real token keeps its position and the last real position's logits equal
    those of the prompt run alone. Only that position goes through the LM head: (B, D) @ (D, V), in float64.
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int, batch_size: int | None = None):
        self.model, self.pad_token_id, self.batch_size = model, int(pad_token_id), batch_size

    @torch.no_grad()
    def next_token_logprobs(self, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> torch.Tensor:
        base = models.unwrap(self.model)
        device = next(base.parameters()).device
        step = self.batch_size or max(len(prompt_ids), 1)
        columns = torch.tensor(list(token_ids), dtype=torch.long)
        out = []
        was_training = base.training
        base.eval()
        try:
            for start in range(0, len(prompt_ids), step):
                chunk = [list(p) for p in prompt_ids[start:start + step]]
                ids = batching.pad_right(chunk, self.pad_token_id).to(device)
                mask = batching.pad_right([[1] * len(p) for p in chunk], 0).to(device)
                hidden = models.backbone_hidden(base, ids, mask)  # (b, T, D)
                last = hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1]  # (b, D)
                weight, bias = models.lm_head_weight(base)
                logits = torch.nn.functional.linear(last, weight, bias).double()  # (b, V)
                cap = models.logit_softcap(base)
                if cap:
                    logits = cap * torch.tanh(logits / cap)
                out.append(torch.log_softmax(logits, dim=-1)[:, columns.to(device)].cpu())
        finally:
            base.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, len(columns), dtype=torch.float64)


@dataclass
class Generation:
    text: str
    truncated: bool  # stopped at max_new_tokens, without EOS


@dataclass
class ChoiceProbs:
    """Verdict probabilities of a batch of prompts over K labels."""

    probs: torch.Tensor  # (B, K) float64, softmax over the K label tokens (rows sum to 1); NaN: not scored
    mass: torch.Tensor  # (B,) float64, total probability the model put on the K labels (of its full vocabulary)


class TextModel:
    """A generation backend plus its tokenizer: conversations in, text out.

    Args:
        backend: a :class:`GenerationBackend`.
        tokenizer: the model's tokenizer.
        name: recorded in every output row (the model directory, usually).
        chat_template: "auto" | "on" | "off": a data row's prompt as the trainers encode it (``answer``); the
            stages' own conversations through the template (auto: when the tokenizer has one) or as
            ``User: ...`` / ``Assistant: ...`` blocks (module docstring).
        max_prompt_length: longer prompts keep their last tokens (counted in ``truncated_prompts``).
        scorer: a :class:`ChoiceScorer`; default: the backend itself when it implements one.
    """

    def __init__(self, backend: GenerationBackend, tokenizer, *, name: str, chat_template: str = "auto",
                 max_prompt_length: int = 384, scorer: ChoiceScorer | None = None):
        self.backend, self.tokenizer, self.name = backend, tokenizer, name
        self.chat = data.uses_chat(tokenizer, chat_template)  # the stages' own conversations
        self.chat_template = chat_template  # data rows' prompts: the trainers' per-row rule (data.chat_for)
        self.max_prompt_length = max_prompt_length
        self.scorer = scorer if scorer is not None else (backend if isinstance(backend, ChoiceScorer) else None)
        self.truncated_prompts = 0

    def render(self, messages: list[dict]) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def encode(self, messages: list[dict]) -> list[int]:
        ids = self._ids(self.render(messages))
        if len(ids) > self.max_prompt_length:  # keep the end: it holds the question and the generation prompt
            self.truncated_prompts += 1
            ids = ids[-self.max_prompt_length:]
        return ids

    def encode_row_prompt(self, prompt, *, where: str = "a prompt") -> list[int]:
        """A data row's prompt (a string or a message list) as ``fastalign train`` encodes a prompt-only row:
        ``data.chat_for`` decides the template (``chat_template``), ``data.encode_prompt`` the ids."""
        chat = data.chat_for(isinstance(prompt, list), self.chat_template, self.tokenizer, where=where)
        ids = data.encode_prompt(self.tokenizer, prompt, chat, max_prompt_length=1 << 62)
        if len(ids) > self.max_prompt_length:  # keep the end, as the trainers do
            self.truncated_prompts += 1
            ids = ids[-self.max_prompt_length:]
        return ids

    def answer(self, prompts: Sequence, sampling: SamplingParams, *, seed: int | None = None,
               where: Sequence[str] | None = None) -> list[Generation]:
        """One response per data-row prompt (string or message list), sampled from the context the trainers
        will put it in (:meth:`encode_row_prompt`). ``where`` names each row in errors."""
        ids = [self.encode_row_prompt(p, where=where[i] if where else f"prompt {i}") for i, p in enumerate(prompts)]
        return self._generate_ids(ids, sampling, seed)

    def generate(self, conversations: Sequence[list[dict]], sampling: SamplingParams, *,
                 seed: int | None = None) -> list[Generation]:
        """One completion per conversation (the stages' own prompts). ``seed`` seeds torch's RNG for this call
        only (the HF backend samples from it) and is passed to engines that take one (prompt i: seed + i); the
        caller's RNG state is left as it was."""
        return self._generate_ids([self.encode(c) for c in conversations], sampling, seed)

    def _generate_ids(self, prompt_ids: list[list[int]], sampling: SamplingParams,
                      seed: int | None) -> list[Generation]:
        if not prompt_ids:
            return []
        if seed is not None and sampling.seed is None and not isinstance(self.backend, HFGenerationBackend):
            sampling = dataclasses.replace(sampling, seed=seed)  # vLLM, a server: their own random streams
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.backend.generate(prompt_ids, sampling)
        texts = self.tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
        return [Generation(t.strip(), bool(tr)) for t, tr in zip(texts, out.truncated)]

    def choice_token_ids(self, text: str, labels: Sequence[str]) -> list[int]:
        """The token id of each label when it directly follows ``text``; an error when a label is not exactly
        one token there (then only parsed text can give a verdict)."""
        head = self._ids(text)
        out = []
        for label in labels:
            full = self._ids(text + label)
            if len(full) != len(head) + 1 or full[:len(head)] != head:
                raise FeedbackError(f"choice label {label!r} is not a single token after the prompt for "
                                    f"{self.name} (it encodes as {full[len(head) - 1:]}); use single-token labels, "
                                    "or verdicts from text")
            out.append(full[-1])
        if len(set(out)) != len(out):
            raise FeedbackError(f"choice labels {list(labels)} share a token for {self.name}")
        return out

    def choice_probs(self, conversations: Sequence[list[dict]], labels: Sequence[str]) -> ChoiceProbs:
        """Probabilities of each label as the next token, renormalized over the labels (float64)."""
        if self.scorer is None:
            raise FeedbackError(f"the backend of {self.name} cannot score tokens; use verdicts from text")
        token_ids, prompt_ids = None, []
        for conv in conversations:
            text = self.render(conv)
            ids = self.choice_token_ids(text, labels)
            if token_ids is not None and ids != token_ids:
                raise FeedbackError(f"choice labels {list(labels)} tokenize differently across prompts for "
                                    f"{self.name}; use verdicts from text")
            token_ids = ids
            prompt_ids.append(self.encode(conv))
        if not prompt_ids:
            return ChoiceProbs(torch.zeros(0, len(labels), dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
        logp = self.scorer.next_token_logprobs(prompt_ids, token_ids).double()  # (B, K)
        probs, mass = torch.softmax(logp, dim=-1), logp.exp().sum(-1)
        unknown = torch.isnan(logp).any(-1)  # a label the scorer could not see (outside a server's top list)
        probs[unknown], mass[unknown] = math.nan, math.nan
        return ChoiceProbs(probs, mass)


# ------------------------------------------------------------------------------------------------ backends
#
# A factory: ``factory(path, *, device, dtype, batch_size, **options) -> (GenerationBackend, tokenizer, scorer)``;
# ``options`` are the backend's own settings (``load_text_model(..., backend_options={...})``; the CLI passes
# base_url, served_model, request_timeout, request_retries, top_logprobs, vllm_kv_cache_gb, vllm_enforce_eager,
# max_model_len). A factory ignores the options it does not use.

def _hf_backend(path: str, *, device: str, dtype: str, batch_size: int | None, **_):
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  batch_size=batch_size)
    return backend, tokenizer, HFChoiceScorer(model, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)


def _openai_backend(path: str, *, batch_size: int | None, base_url: str | None = None,
                    served_model: str | None = None, request_timeout: float = 120.0, request_retries: int = 3,
                    top_logprobs: int = 20, **_):
    """An OpenAI-compatible server (``vllm serve``, SGLang, TGI, llama.cpp's server) at ``base_url``; ``path`` is
    the local directory of the served model's tokenizer (prompts go to the server as its token ids)."""
    from fastalign.train.generation_http import OpenAIGenerationBackend

    if not base_url:
        raise FeedbackError("--generation-backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    tokenizer = models.load_tokenizer(path)
    backend = OpenAIGenerationBackend(base_url, eos_token_id=tokenizer.eos_token_id, model=served_model,
                                      batch_size=batch_size, timeout=request_timeout, retries=request_retries,
                                      tokenizer=tokenizer, top_logprobs=top_logprobs)
    return backend, tokenizer, backend


def _vllm_backend(path: str, *, dtype: str, top_logprobs: int = 20, max_model_len: int | None = None,
                  vllm_kv_cache_gb: float | None = None, vllm_enforce_eager: bool = False, seed: int = 0, **_):
    """An in-process vLLM engine (``pip install 'fastalign[vllm]'``); scores tokens from its top log-probs."""
    from fastalign.train.generation_vllm import VLLMGenerationBackend

    tokenizer = models.load_tokenizer(path)
    engine_dtype = "auto" if dtype == "auto" else dtype
    backend = VLLMGenerationBackend(path, eos_token_id=tokenizer.eos_token_id, dtype=engine_dtype, seed=seed,
                                    max_model_len=max_model_len, kv_cache_gb=vllm_kv_cache_gb,
                                    enforce_eager=vllm_enforce_eager, engine_kwargs={"max_logprobs": top_logprobs})
    backend.top_logprobs = top_logprobs
    return backend, tokenizer, backend


BACKENDS: dict[str, Callable] = {"hf": _hf_backend, "vllm": _vllm_backend, "openai": _openai_backend}


def register_backend(name: str, factory: Callable) -> None:
    """``factory(path, *, device, dtype, batch_size, **options) -> (GenerationBackend, tokenizer, ChoiceScorer |
    None)``."""
    BACKENDS[name] = factory


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_text_model(model: str | Path | None, *, backend: str = "hf", device: str = "auto", dtype: str = "auto",
                    chat_template: str = "auto", max_prompt_length: int = 384, batch_size: int | None = None,
                    backend_options: dict | None = None) -> TextModel:
    """A :class:`TextModel` for the local checkpoint ``model`` (None: the embedded tiny model; for ``openai``
    the served model's tokenizer directory). ``backend_options`` go to the backend's factory (see above).
    The name recorded in output rows is the path, or ``URL#served-model`` for a server."""
    if backend not in BACKENDS:
        raise FeedbackError(f"unknown --generation-backend {backend!r}; registered: {sorted(BACKENDS)}")
    path = str(model) if model else str(default_tiny_model_dir())
    try:
        gen, tokenizer, scorer = BACKENDS[backend](path, device=resolve_device(device), dtype=dtype,
                                                   batch_size=batch_size, **(backend_options or {}))
    except FileNotFoundError as exc:
        raise FeedbackError(str(exc)) from None
    name = path
    if backend == "openai":
        name = f"{gen.base_url}#{gen.served_model()}"  # asks the server now: an absent one fails before any work
    return TextModel(gen, tokenizer, name=name, chat_template=chat_template, max_prompt_length=max_prompt_length,
                     scorer=scorer)
