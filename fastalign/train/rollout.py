"""Rollouts for GRPO/PPO: sampled completions laid out as one batch, scored, rewarded, cut into micro-batches.

    prompts (token ids) --generation backend--> completion ids --build_rollout--> RolloutBatch
    RolloutBatch --score_logprobs(policy / reference)--> old / ref log-probs (B, T), via the fused op
    collect(): the above for G completions per prompt, plus decoded texts and rewards -> Experience
    off_policy_metrics(): the sampler's own log-probs (when it reports them) against the recomputed old ones
    micro_batches(): the rollout and its per-row tensors (log-probs, advantages) as the actor loss's inputs
    RolloutInUse: the micro-batches the next num_iterations optimizer steps take, checkpointed with the run

Layout: sequences are stored right-padded, ``[prompt | completion | pad]``; the sampler sees the prompts left-padded
with positions counted from each row's first real token, so each real token sits at the same position in both
layouts and the recomputed log-probs are those of the sampled distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

import fastalign as fa
from fastalign.train import data, generation, metrics, models, rewards
from fastalign.train.config import RLConfig
from fastalign.train.ref_model import ReferenceModel


def prompts_and_rewards(cfg: RLConfig, tokenizer, device) -> tuple[list, rewards.RewardFn]:
    """The tokenized RL prompts of ``cfg.train_file`` (default: the shipped addition task) and the reward function
    built from ``cfg.reward_funcs`` / ``cfg.reward_model``: the data side shared by GRPO and PPO."""
    rows = data.load_rows(cfg.train_file or data.demo_files()["rl"], "rl", max_samples=cfg.max_samples,
                          tokenizer=tokenizer, chat_template=cfg.chat_template)
    examples = data.tokenize_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                     chat_template=cfg.chat_template)
    reward_fn = rewards.build_rewards(cfg.reward_funcs, cfg.reward_weights, reward_model=cfg.reward_model,
                                      reward_model_weight=cfg.reward_model_weight, device=device,
                                      chat_template=cfg.chat_template)
    return examples, reward_fn


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


def build_rollout(prompt_ids: Sequence[Sequence[int]], completions: generation.Completions, *, pad_token_id: int,
                  ignore_index: int = data.IGNORE) -> RolloutBatch:
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


@dataclass
class Experience:
    """One rollout: G completions of each prompt (rows g*G .. g*G+G-1 share prompt g) and their rewards."""

    batch: RolloutBatch
    prompts: list[str]  # the dataset's prompt of each row (what reward functions and reward models see)
    completions: list[str]  # decoded completion text of each row, without EOS
    rewards: torch.Tensor  # (B,) fp32, the weighted sum
    reward_parts: dict[str, torch.Tensor]  # name -> (B,) fp32
    sampler_logprobs: torch.Tensor | None = None  # (B, T) fp32 aligned with batch.labels, 0 off the response


_NOT_FIELDS = ("prompt", "prompt_ids", "prompt_text")


def collect(backend: generation.GenerationBackend, tokenizer, examples: Sequence[dict], *, group_size: int,
            sampling: generation.SamplingParams, reward_fn) -> Experience:
    """Sample ``group_size`` completions per example (from ``data.tokenize_prompts``) and score them.

    ``reward_fn(prompts, completions, fields)`` (a :class:`fastalign.train.rewards.Rewards`) gets every other
    field of the rows, repeated per completion, plus ``truncated``.
    """
    rows = [e for e in examples for _ in range(group_size)]
    prompt_ids = [e["prompt_ids"] for e in rows]
    completions = backend.generate(prompt_ids, sampling)
    batch = build_rollout(prompt_ids, completions, pad_token_id=tokenizer.pad_token_id)
    texts = generation.decode_completions(tokenizer, completions)
    keys = [k for k in rows[0] if k not in _NOT_FIELDS] if rows else []
    fields = {k: [e.get(k) for e in rows] for k in keys}
    fields["truncated"] = list(completions.truncated)
    prompts = [e["prompt"] for e in rows]
    total, parts = reward_fn(prompts, texts, fields)
    return Experience(batch=batch, prompts=prompts, completions=texts, rewards=total, reward_parts=parts,
                      sampler_logprobs=sampler_logprobs(batch, completions))


def sampler_logprobs(batch: RolloutBatch, completions: generation.Completions) -> torch.Tensor | None:
    """(B, T) fp32: the sampler's log-prob of each completion token, in the columns of ``batch.labels`` (0 off the
    response); None when the backend reports none."""
    if completions.logprobs is None:
        return None
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    for i, (start, lps) in enumerate(zip(batch.prompt_lengths.tolist(), completions.logprobs)):
        if len(lps) != int(batch.completion_lengths[i]):
            raise ValueError(f"row {i}: {len(lps)} sampler log-probs for {int(batch.completion_lengths[i])} tokens")
        out[i, start:start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return out


def off_policy_metrics(per_row: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    """How far the sampler's distribution is from the trainer's own recomputation of it, over response tokens:
    ``sampler_logprob_diff`` mean |log pi_sampler - log pi_old|, ``sampler_kl`` the k3 estimate of
    KL(pi_sampler || pi_old) (the tokens were drawn from the sampler). Empty when there are no sampler log-probs."""
    sampler = per_row.get("sampler_logprobs")
    if sampler is None:
        return {}
    old, m = per_row["old_logprobs"], mask.float()
    count = m.sum().clamp(min=1)
    kl = fa.kl_penalty(sampler, old, kind="k3")  # d = old - sampler: exp(d) - d - 1, stable for small d
    return {"sampler_logprob_diff": metrics.to_float(((sampler - old).abs() * m).sum() / count),
            "sampler_kl": metrics.to_float((kl * m).sum() / count)}


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


class RolloutInUse:
    """The rollout the optimizer steps are on, and how many of its ``iterations`` steps are taken.

    Checkpointed per process (``TrainLoop(rank_state=...)``) with the micro-batches and their metrics, so a
    checkpoint taken inside a rollout's ``num_iterations`` resumes that rollout bit for bit instead of sampling a
    new one. ``take()`` counts a step before the step runs: the checkpoint written at the end of that step then
    records it as taken.
    """

    def __init__(self, iterations: int, device):
        self.iterations, self.device = iterations, device
        self.micro: list[dict] = []
        self.stats: dict[str, float] = {}
        self.taken = iterations  # none in use: the next step samples one

    @property
    def pending(self) -> bool:
        return self.taken < self.iterations

    def start(self, micro: list[dict], stats: dict[str, float]) -> None:
        self.micro, self.stats, self.taken = micro, stats, 0

    def take(self) -> list[dict]:
        self.taken += 1
        return self.micro

    def state_dict(self) -> dict:
        if not self.pending:
            return {"taken": self.taken}
        # clone: a micro-batch is a slice of the whole rollout, and torch.save would write the whole storage
        micro = [{k: v.detach().cpu().clone() for k, v in mb.items()} for mb in self.micro]
        return {"taken": self.taken, "micro": micro, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        if "micro" not in state:
            self.taken = self.iterations
            return
        self.taken = int(state["taken"])
        self.micro = [{k: v.to(self.device) for k, v in mb.items()} for mb in state["micro"]]
        self.stats = dict(state["stats"])


def score_rollout(policy: nn.Module, reference: ReferenceModel | None, batch: RolloutBatch, *, temperature: float,
                  fused: bool, micro_batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``{"old_logprobs"}`` (B, T) under ``policy``, plus ``"ref_logprobs"`` when there is a ``reference``, and the
    k1 KL per token, (old - ref) * response_mask (B, T) (None without a reference)."""
    score = dict(temperature=temperature, fused=fused, micro_batch_size=micro_batch_size)
    per_row = {"old_logprobs": score_logprobs(policy, batch, **score)}
    if reference is None:
        return per_row, None
    with reference.scoring(policy) as ref:
        per_row["ref_logprobs"] = score_logprobs(ref, batch, **score)
    return per_row, (per_row["old_logprobs"] - per_row["ref_logprobs"]) * batch.response_mask


def rollout_metrics(exp: Experience, kl_seq: torch.Tensor | None) -> dict[str, float]:
    """Reward (the total and each function's), completion length, truncation, reward/length correlation, and the
    mean per-sequence KL to the reference at sampling time when there is one (``kl_seq``: (B,))."""
    lengths = exp.batch.completion_lengths.float()
    out = {"reward": exp.rewards.mean(), "completion_length": lengths.mean(),
           "truncated_frac": exp.batch.truncated.float().mean(),
           "reward_length_corr": metrics.reward_length_correlation(exp.rewards, lengths),
           **{f"reward/{k}": v.mean() for k, v in exp.reward_parts.items()}}
    if kl_seq is not None:
        out["kl"] = kl_seq.mean()
    return {k: metrics.to_float(v) for k, v in out.items()}
