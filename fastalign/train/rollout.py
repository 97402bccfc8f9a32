"""Rollouts for GRPO/PPO: a pluggable generation backend, the batch layout, log-prob scoring, and the actor loss
both algorithms share.

    prompts (token ids) --backend.generate--> completion ids --build_rollout--> RolloutBatch
    RolloutBatch --score_logprobs(policy / reference)--> old / ref log-probs (B, T), via the fused op
    collect(): the above for G completions per prompt, plus decoded texts and rewards
    actor_loss(): clipped policy-gradient loss (+ KL, entropy) from hidden states, or the unfused reference

The backend only produces token ids. Log-probs used by the losses are always recomputed by the trainer's own
forward (``fa.linear_logprobs`` on the last hidden states), never taken from the sampler's scores: a sampler
(HF ``generate`` with a KV cache, or vLLM) computes them with different kernels and numerics, which would bias
the importance ratio. A vLLM engine plugs in by implementing :class:`GenerationBackend`.

Layout: sequences are stored right-padded, ``[prompt | completion | pad]``. The sampler sees the prompts left-
padded, with position ids counted from each row's first real token, so each real token sits at the same position
in both layouts and the recomputed log-probs are those of the sampled distribution.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

import fastalign as fa
from fastalign.reference.rl import aggregate
from fastalign.train import data, distributed, models, rewards
from fastalign.train.config import RLConfig


def prompts_and_rewards(cfg: RLConfig, tokenizer, device) -> tuple[list, rewards.RewardFn]:
    """The tokenized RL prompts of ``cfg.train_file`` (default: the shipped addition task) and the reward function
    built from ``cfg.reward_funcs`` / ``cfg.reward_model``: the data side shared by GRPO and PPO."""
    rows = data.load_rows(cfg.train_file or data.demo_files()["rl"], "rl", max_samples=cfg.max_samples)
    examples = data.tokenize_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                     chat_template=cfg.chat_template)
    reward_fn = rewards.build_rewards(cfg.reward_funcs, cfg.reward_weights, reward_model=cfg.reward_model,
                                      reward_model_weight=cfg.reward_model_weight, device=device,
                                      chat_template=cfg.chat_template)
    return examples, reward_fn


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
        ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding: generation continues from the last column
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
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


@dataclass
class RolloutBatch:
    """Prompt + completion sequences, right-padded. All tensors (B, T) unless noted.

    ``response_mask`` is 1 on completion tokens (EOS included, padding and prompt excluded); ``labels`` equal
    ``input_ids`` there and -100 elsewhere, so ``models.token_logprobs(..., labels)`` scores exactly the
    completion tokens.
    """

    input_ids: torch.Tensor  # int64
    attention_mask: torch.Tensor  # int64
    response_mask: torch.Tensor  # bool
    labels: torch.Tensor  # int64, -100 outside the response
    prompt_lengths: torch.Tensor  # (B,) int64
    completion_lengths: torch.Tensor  # (B,) int64
    truncated: torch.Tensor  # (B,) bool

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, index: torch.Tensor | slice) -> "RolloutBatch":
        """Rows ``index`` (a micro-batch), trimmed to the longest kept sequence."""
        rows = RolloutBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))
        width = int(rows.attention_mask.sum(1).max()) if rows.attention_mask.numel() else 0
        for name in ("input_ids", "attention_mask", "response_mask", "labels"):
            setattr(rows, name, getattr(rows, name)[:, :width])
        return rows

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_rollout(prompt_ids: Sequence[Sequence[int]], completions: Completions, *, pad_token_id: int,
                  ignore_index: int = -100) -> RolloutBatch:
    """Lay prompts and their completions out as one right-padded batch with response masks."""
    if len(prompt_ids) != len(completions.token_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completions.token_ids)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completions.token_ids)]
    b, t = len(lengths), max(lengths)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    response_mask = torch.zeros((b, t), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completions.token_ids)):
        input_ids[i, :lengths[i]] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :lengths[i]] = 1
        response_mask[i, len(p):lengths[i]] = True
    labels = torch.where(response_mask, input_ids, torch.full_like(input_ids, ignore_index))
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, labels=labels,
        prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
        completion_lengths=torch.tensor([len(c) for c in completions.token_ids], dtype=torch.long),
        truncated=torch.tensor(completions.truncated, dtype=torch.bool),
    )


@torch.no_grad()
def score_logprobs(model: nn.Module, batch: RolloutBatch, *, temperature: float = 1.0, fused: bool = True,
                   micro_batch_size: int | None = None) -> torch.Tensor:
    """(B, T) fp32 log-probs (on the model's device) of the response tokens under ``model``, 0 elsewhere; no grad.

    ``temperature`` must be the sampling temperature: the ratio compares the policy that sampled the tokens.
    """
    device = next(models.unwrap(model).parameters()).device
    step = micro_batch_size or len(batch)
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=device)
    for start in range(0, len(batch), step):
        rows = slice(start, start + step)
        ids, mask, labels = (getattr(batch, k)[rows].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logp = models.token_logprobs(model, ids, mask, labels, fused=fused, temperature=temperature).logprobs
        out[rows] = logp.float()
    return out


def decode_completions(tokenizer, completions: Completions) -> list[str]:
    """Completion text without EOS/pad/special tokens."""
    return tokenizer.batch_decode(completions.token_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------- experience for GRPO / PPO

@dataclass
class Experience:
    """One rollout: G completions of each prompt (rows g*G .. g*G+G-1 share prompt g) and their rewards."""

    batch: RolloutBatch
    prompts: list[str]  # the dataset's prompt of each row (what reward functions and reward models see)
    completions: list[str]  # decoded completion text of each row, without EOS
    rewards: torch.Tensor  # (B,) fp32, the weighted sum
    reward_parts: dict[str, torch.Tensor]  # name -> (B,) fp32


_NOT_FIELDS = ("prompt", "prompt_ids", "prompt_text")


def collect(backend: GenerationBackend, tokenizer, examples: Sequence[dict], *, group_size: int,
            sampling: SamplingParams, reward_fn) -> Experience:
    """Sample ``group_size`` completions per example (from ``data.tokenize_prompts``) and score them.

    ``reward_fn(prompts, completions, fields)`` (a :class:`fastalign.train.rewards.Rewards`) gets every other
    field of the rows, repeated per completion, plus ``truncated``.
    """
    rows = [e for e in examples for _ in range(group_size)]
    prompt_ids = [e["prompt_ids"] for e in rows]
    completions = backend.generate(prompt_ids, sampling)
    batch = build_rollout(prompt_ids, completions, pad_token_id=tokenizer.pad_token_id)
    texts = decode_completions(tokenizer, completions)
    keys = [k for k in rows[0] if k not in _NOT_FIELDS] if rows else []
    fields = {k: [e.get(k) for e in rows] for k in keys}
    fields["truncated"] = list(completions.truncated)
    prompts = [e["prompt"] for e in rows]
    total, parts = reward_fn(prompts, texts, fields)
    return Experience(batch=batch, prompts=prompts, completions=texts, rewards=total, reward_parts=parts)


def mean_over_processes(stats: dict[str, float], info: distributed.DistInfo) -> dict[str, float]:
    """Average rollout metrics over processes (each holds an equal share of the rollout), so the logged reward is
    the global batch's; one small all-reduce."""
    if not info.enabled:
        return stats
    names = sorted(stats)
    packed = torch.tensor([float(stats[k]) for k in names], dtype=torch.float64, device=info.device)
    return dict(zip(names, (distributed.all_reduce_sum(packed) / info.world_size).tolist()))


class Reference:
    """The frozen reference policy for KL terms: ``ref_model`` when given; with LoRA, the policy with its
    adapters disabled; otherwise a frozen copy of the initial policy."""

    def __init__(self, cfg, model_path, policy: nn.Module, device):
        self.policy, self.ctx = None, contextlib.nullcontext
        if cfg.ref_model is None and cfg.lora_r > 0:
            self.policy, self.ctx = policy, lambda: models.unwrap(self.policy, keep_peft=True).disable_adapter()
            self.model = None
        else:
            self.model = models.load_model(cfg.ref_model or model_path, dtype=cfg.dtype, device=device,
                                           attn=cfg.attn_implementation)
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, **kwargs) -> torch.Tensor:
        with self.ctx():
            return score_logprobs(self.model if self.model is not None else self.policy, batch, **kwargs)


def micro_batches(batch: RolloutBatch, per_row: dict[str, torch.Tensor], size: int) -> list[dict]:
    """Split a rollout into micro-batches of ``size`` rows: dicts of (b, t) tensors (trimmed to the longest row)
    with ``per_row`` entries ((B,) or (B, T)) sliced alongside."""
    out = []
    for start in range(0, len(batch), size):
        rows = slice(start, start + size)
        part = batch.select(rows)
        width = part.input_ids.shape[1]
        mb = {"input_ids": part.input_ids, "attention_mask": part.attention_mask, "labels": part.labels,
              "response_mask": part.response_mask}
        for name, t in per_row.items():
            mb[name] = t[rows] if t.dim() == 1 else t[rows, :width]
        out.append(mb)
    return out


def actor_loss(model: nn.Module, mb: dict, *, fused: bool = True, clip_low: float = 0.2,
               clip_high: float | None = None, dual_clip: float | None = None, agg: str = "token-mean",
               norm_len: int | None = None, kl_coef: float = 0.0, kl_kind: str = "k3", entropy_coef: float = 0.0,
               temperature: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of one micro-batch, and its stats.

    ``mb``: (b, t) ``input_ids``, ``attention_mask``, ``labels`` (-100 off the response), ``response_mask``,
    ``old_logprobs``, ``advantages`` ((b,) per sequence or (b, t) per token), optional ``ref_logprobs``; token
    columns aligned with labels (column t scores ``input_ids[:, t]``).

    fused=True: ``fa.linear_policy_loss`` on the last hidden states and the LM head (no [b, t, V] logits).
    fused=False: full logits -> log-probs -> ``fa.ppo_policy_loss`` + KL and entropy terms, the reference.
    Both use an explicit ``norm_len`` so that "seq-mean-token-sum-norm" does not depend on the padded width.
    """
    labels, mask, old, adv = mb["labels"], mb["response_mask"], mb["old_logprobs"], mb["advantages"]
    ref = mb.get("ref_logprobs")
    if kl_coef and ref is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs in the micro-batch")
    clip = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, norm_len=norm_len)
    if fused:
        def fn(m, hidden):
            weight, bias = models.lm_head_weight(m)
            # hidden[:, t] predicts labels[:, t + 1]: drop the last state and the first label column
            return fa.linear_policy_loss(
                hidden[:, :-1], weight, labels[:, 1:], old[:, 1:], adv if adv.dim() == 1 else adv[:, 1:],
                mask[:, 1:], ref_logprobs=ref[:, 1:] if ref is not None else None, kl_coef=kl_coef,
                kl_kind=kl_kind, entropy_coef=entropy_coef, return_entropy=True, bias=bias,
                temperature=temperature, softcap=models.logit_softcap(m), backend=backend, **clip)

        return models.forward_head(model, mb["input_ids"], mb["attention_mask"], fn)
    out = models.token_logprobs(model, mb["input_ids"], mb["attention_mask"], labels, fused=False,
                                temperature=temperature, return_entropy=True)
    pg, stats = fa.ppo_policy_loss(out.logprobs, old, adv, mask, backend=backend, **clip)
    stats = dict(stats, pg_loss=pg.detach())
    loss = pg
    count = mask.sum().clamp(min=1)
    if ref is not None:
        kl = fa.kl_penalty(out.logprobs, ref, kind=kl_kind)
        loss = loss + kl_coef * aggregate(kl, mask, agg, norm_len)
        stats["kl"] = ((kl * mask).sum() / count).detach()
    loss = loss - entropy_coef * aggregate(out.entropy, mask, agg, norm_len)
    stats["entropy"] = ((out.entropy * mask).sum() / count).detach()
    return loss, stats
