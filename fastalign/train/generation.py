"""Generation: a pluggable sampler that maps prompt token ids to completion token ids.

    backend.generate(prompt_ids, SamplingParams) -> Completions(token_ids, truncated)
    backend.sync_weights(model)          after each optimizer step (an engine with its own weights refreshes them)

The backend only produces token ids. Log-probs used by the losses are always recomputed by the trainer's own
forward (``rollout.score_logprobs``), never taken from the sampler's scores: a sampler (HF ``generate`` with a KV
cache, or vLLM) computes them with different kernels and numerics, which would bias the importance ratio. A vLLM
engine plugs in by implementing :class:`GenerationBackend`.

:class:`HFGenerationBackend` sees the prompts left-padded, with position ids counted from each row's first real
token, so each real token sits at the same position as in the trainer's right-padded rollout layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from fastalign.train import data, models


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. ``greedy=True`` ignores temperature/top-p/top-k (evaluation)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; HF's default of 50 would silently sample from a different distribution
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completions:
    """What a backend returns: per prompt, the generated ids (ending with EOS unless truncated)."""

    token_ids: list[list[int]]
    truncated: list[bool]  # hit max_new_tokens without EOS


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
        step = self.batch_size or max(len(prompt_ids), 1)
        out = Completions([], [])
        for start in range(0, len(prompt_ids), step):
            part = self._generate(prompt_ids[start:start + step], sampling)
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
        ids, mask = data.pad_left(prompt_ids, self.pad_token_id), data.attention_mask(prompt_ids, left=True)
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


def decode_completions(tokenizer, completions: Completions) -> list[str]:
    """Completion text without EOS/pad/special tokens."""
    return tokenizer.batch_decode(completions.token_ids, skip_special_tokens=True)


def build_sampler(cfg, model: nn.Module, tokenizer) -> tuple[HFGenerationBackend, SamplingParams]:
    """The HF backend on ``model`` and the sampling settings of an RL config (``config.RLConfig``)."""
    backend = HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  batch_size=cfg.generation_batch_size)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k)
    return backend, sampling
