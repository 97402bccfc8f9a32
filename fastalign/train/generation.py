"""Generation: a pluggable sampler that maps prompt token ids to completion token ids.

    backend.generate(prompt_ids, SamplingParams) -> Completions(token_ids, truncated[, logprobs])
    backend.sync_weights(model)          after each optimizer step (an engine with its own weights refreshes them)

The log-probs the losses use are always recomputed by the trainer's own forward (``rollout.score_logprobs``): a
sampler (HF ``generate`` with a KV cache, vLLM, a server) computes them with other kernels and numerics, which
would bias the importance ratio. An engine that reports the log-probs it sampled with (``Completions.logprobs``)
lets the trainer measure that gap every step and, optionally, correct for it (``--sampler-is-cap``).

Backends: :class:`HFGenerationBackend` (``--generation-backend hf``, the default: the policy itself);
``generation_vllm.VLLMGenerationBackend`` (``vllm``: an in-process vLLM engine, weights pushed after each step);
``generation_http.OpenAIGenerationBackend`` (``openai``: any OpenAI-compatible completions server, no weight sync);
``generation_backends.build_sampler`` builds the one an RL config names.

:class:`HFGenerationBackend` sees the prompts left-padded, with position ids counted from each row's first real
token, so each real token sits at the same position as in the trainer's right-padded rollout layout.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from fastalign.train import batching, models


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. ``greedy=True`` ignores temperature/top-p/top-k (evaluation).

    ``n`` completions per prompt come back prompt-major (row p * n + j). ``seed`` (None: the backend's own random
    stream) makes a call reproducible on one backend: the engines seed prompt i with seed + i, so repeated prompts
    still differ; HF seeds one stream for the whole call.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; HF's default of 50 would silently sample from a different distribution
    greedy: bool = False
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Completions:
    """What a backend returns: per row (prompt-major when ``n`` > 1), the generated ids, ending with EOS unless
    truncated; ``logprobs`` the sampler's own log-prob of each of those tokens (one float per id) when the backend
    reports them (vLLM, a server), None otherwise (HF ``generate``)."""

    token_ids: list[list[int]]
    truncated: list[bool]  # hit max_new_tokens without EOS
    logprobs: list[list[float]] | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """A sampler. ``generate`` maps prompt token ids to completion token ids; ``sync_weights`` is called after
    each optimizer step so an engine holding its own copy of the weights (vLLM) can refresh them."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Completions: ...

    def sync_weights(self, model: nn.Module) -> None: ...


class HFGenerationBackend:
    """``transformers`` ``model.generate`` with a KV cache; shares the policy's weights (``sync_weights`` is a no-op).

    Args:
        model: the policy (HF model, or wrapped by HeadForward/DDP/peft).
        pad_token_id, eos_token_id: from the tokenizer.
        batch_size: prompts per ``generate`` call (bounds the KV cache); None = all at once.
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int, eos_token_id: int | Sequence[int],
                 batch_size: int | None = None):
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.eos_ids = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
        self.batch_size = batch_size

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Completions:
        rows = [p for p in prompt_ids for _ in range(sampling.n)]
        step = self.batch_size or max(len(rows), 1)
        out = Completions([], [])
        # a seed gives one stream for the whole call (HF samples a batch from one generator), restored afterwards
        with _seeded(sampling.seed, next(models.unwrap(self.model).parameters()).device):
            for start in range(0, len(rows), step):
                part = self._generate(rows[start:start + step], sampling)
                out.token_ids += part.token_ids
                out.truncated += part.truncated
        return out

    def _generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Completions:
        base = models.unwrap(self.model)
        device = next(base.parameters()).device
        width = max(len(p) for p in prompt_ids)
        if min(len(p) for p in prompt_ids) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        # left padding: generation continues from the last column
        ids, mask = batching.pad_left(prompt_ids, self.pad_token_id), batching.attention_mask(prompt_ids, left=True)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
                      eos_token_id=sorted(self.eos_ids), do_sample=not sampling.greedy)
        if sampling.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        was_training = base.training
        base.eval()  # no dropout while sampling
        try:
            seqs = base.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            base.train(was_training)
        out = Completions([], [])
        for row in seqs[:, width:].tolist():
            cut = next((t + 1 for t, tok in enumerate(row) if tok in self.eos_ids), None)
            out.token_ids.append(row[:cut] if cut is not None else row)
            out.truncated.append(cut is None)
        return out


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def decode_completions(tokenizer, completions: Completions) -> list[str]:
    """Completion text without EOS/pad/special tokens."""
    return tokenizer.batch_decode(completions.token_ids, skip_special_tokens=True)
