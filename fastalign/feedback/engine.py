"""A model behind the generation protocol, seen as text in and text out, plus choice-token scoring.

    TextModel(backend, tokenizer)            any GenerationBackend (HF now; vLLM / an HTTP server later)
      .generate(conversations, sampling, seed=...)  -> [Generation(text, truncated)]
      .choice_probs(conversations, labels)          -> ChoiceProbs(probs (B, K) float64, mass (B,) float64)

The backend only maps token ids to token ids (:class:`GenerationBackend`). Verdicts read from log-probs need a
second, optional capability, :class:`ChoiceScorer`: the log-probability of a few given next tokens after each
prompt. :class:`HFChoiceScorer` gets them from one forward pass of the HF model (the last position's logits
only, so no [B, T, V] tensor); another backend provides them by implementing ``next_token_logprobs`` itself (a
vLLM engine from its top log-probs, an OpenAI-compatible server from ``logprobs``). Without a scorer the stages
fall back to generating a verdict and parsing it.

Backends are built by name from :data:`BACKENDS` (``register_backend("vllm", factory)`` adds one); a factory
takes the model directory and returns ``(backend, tokenizer, scorer or None)``.
"""
from __future__ import annotations

import contextlib
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

    probs: torch.Tensor  # (B, K) float64, softmax over the K label tokens (rows sum to 1)
    mass: torch.Tensor  # (B,) float64, total probability the model put on the K labels (of its full vocabulary)


class TextModel:
    """A generation backend plus its tokenizer: conversations in, text out.

    Args:
        backend: a :class:`GenerationBackend`.
        tokenizer: the model's tokenizer.
        name: recorded in every output row (the model directory, usually).
        chat_template: "auto" | "on" | "off", as the trainers: with a template, conversations are rendered by
            it with the generation prompt; without, as ``User: ...`` / ``Assistant: ...`` blocks.
        max_prompt_length: longer prompts keep their last tokens (counted in ``truncated_prompts``).
        scorer: a :class:`ChoiceScorer`; default: the backend itself when it implements one.
    """

    def __init__(self, backend: GenerationBackend, tokenizer, *, name: str, chat_template: str = "auto",
                 max_prompt_length: int = 384, scorer: ChoiceScorer | None = None):
        self.backend, self.tokenizer, self.name = backend, tokenizer, name
        self.chat = data.uses_chat(tokenizer, chat_template)
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

    def generate(self, conversations: Sequence[list[dict]], sampling: SamplingParams, *,
                 seed: int | None = None) -> list[Generation]:
        """One completion per conversation. ``seed`` seeds torch's RNG for this call only (the HF backend
        samples from it); the caller's RNG state is left as it was."""
        if not conversations:
            return []
        prompt_ids = [self.encode(c) for c in conversations]
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
        return ChoiceProbs(torch.softmax(logp, dim=-1), logp.exp().sum(-1))


# ------------------------------------------------------------------------------------------------ backends

def _hf_backend(path: str, *, device: str, dtype: str, batch_size: int | None):
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  batch_size=batch_size)
    return backend, tokenizer, HFChoiceScorer(model, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)


BACKENDS: dict[str, Callable] = {"hf": _hf_backend}


def register_backend(name: str, factory: Callable) -> None:
    """``factory(path, *, device, dtype, batch_size) -> (GenerationBackend, tokenizer, ChoiceScorer | None)``."""
    BACKENDS[name] = factory


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_text_model(model: str | Path | None, *, backend: str = "hf", device: str = "auto", dtype: str = "auto",
                    chat_template: str = "auto", max_prompt_length: int = 384,
                    batch_size: int | None = None) -> TextModel:
    """A :class:`TextModel` for the local checkpoint ``model`` (None: the embedded tiny model)."""
    if backend not in BACKENDS:
        raise FeedbackError(f"unknown backend {backend!r}; registered: {sorted(BACKENDS)}")
    path = str(model) if model else str(default_tiny_model_dir())
    try:
        gen, tokenizer, scorer = BACKENDS[backend](path, device=resolve_device(device), dtype=dtype,
                                                   batch_size=batch_size)
    except FileNotFoundError as exc:
        raise FeedbackError(str(exc)) from None
    return TextModel(gen, tokenizer, name=path, chat_template=chat_template, max_prompt_length=max_prompt_length,
                     scorer=scorer)
