"""PPO for language models (Ouyang et al. 2022; the recipe of TRL's PPOTrainer and verl): a policy, a separate value
model (a scalar head on its own backbone), GAE, a clipped value loss, and a KL penalty in the reward or the loss.

Notation: a completion y_1..y_T of prompt x is sampled from pi_old; s_t = (x, y_<t) is the state before token t;
score = the sequence reward (reward functions and/or a reward model), given at the last token T;
    r_t = score * 1[t = T] - kl_coef * (log pi_old(y_t|s_t) - log ref(y_t|s_t))       kl_in_reward=True
    delta_t = r_t + gamma V(s_t+1) - V(s_t);  A_t = delta_t + gamma lam A_t+1;  R_t = A_t + V(s_t)   (fa.gae)
    loss = PPO-clip(A) [+ kl_coef * KL_t when kl_in_reward=False] - entropy_coef * H_t
           + vf_coef * 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-cliprange_value) - R)^2)
V(s_t) is the value model's head on its last hidden state at position t - 1 (the token before y_t). Advantages
are whitened over the rollout batch (``whiten_advantages``). Each rollout is used for ``num_iterations`` steps.

``fused=True``: the policy term is ``fa.linear_policy_loss`` from hidden states (no [B, T, V] logits);
``fused=False``: full logits and ``fa.ppo_policy_loss`` (the reference path).

Python: ``fastalign.train.ppo.train(PPOConfig(...))``; CLI: ``fastalign train ppo [--config c.yaml] [--flags]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fastalign as fa
from fastalign.train import actor, batching, distributed, generation_backends, models, rollout
from fastalign.train.config import RLConfig, RUN_DIR_HELP
from fastalign.train.config_parsing import option, require
from fastalign.train.loop import TrainLoop, prepare
from fastalign.train.ref_model import ReferenceModel


@dataclass
class PPOConfig(RLConfig):
    """PPO: policy + value model, GAE, clipped policy and value losses, KL penalty to a reference."""

    output_dir: str = option("runs/ppo", RUN_DIR_HELP)
    learning_rate: float = option(1e-6, "peak learning rate (AdamW), for the policy and the value model")
    value_model: str | None = option(None, "value-model checkpoint (loaded with a scalar head, e.g. the reward "
                                           "model); none: the policy checkpoint with a fresh head")
    vf_coef: float = option(0.1, "weight of the value loss")
    cliprange_value: float | None = option(0.2, "value clip around the rollout-time values; none: unclipped")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "whiten advantages over the rollout batch")
    kl_coef: float = option(0.05, "KL penalty weight (0: no reference model needed)")
    kl_in_reward: bool = option(True, "subtract kl_coef * k1 KL from the per-token reward (InstructGPT/TRL); "
                                      "off: add kl_coef * KL(kl_kind) to the loss (GRPO/verl style)")
    kl_kind: str = option("k3", "KL estimator of the loss term (kl_in_reward=False)", choices=("k1", "k2", "k3"))
    num_iterations: int = option(2, "optimizer steps per rollout batch (PPO epochs)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("gamma", "lam"):
            require(self, name, 0, 1)
        require(self, "vf_coef", 0)
        require(self, "cliprange_value", 0, low_open=True)


def shifted_values(value_model, input_ids, attention_mask) -> torch.Tensor:
    """(B, T) fp32 V(s_t) aligned with tokens: column t is the head on the hidden state at t - 1; column 0 is 0."""
    values = models.token_values(value_model, input_ids, attention_mask)  # (B, T): head at every position
    return torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)


@torch.no_grad()
def rollout_values(value_model, batch: rollout.RolloutBatch, micro_batch_size: int) -> torch.Tensor:
    """(B, T) fp32 ``shifted_values`` of a whole rollout, in micro-batches, 0 off the response."""
    width, out = batch.input_ids.shape[1], []
    for start in range(0, len(batch), micro_batch_size):
        part = batch.select(slice(start, start + micro_batch_size))  # trimmed to its longest row
        values = shifted_values(value_model, part.input_ids, part.attention_mask)
        out.append(torch.nn.functional.pad(values, (0, width - values.shape[1])))
    return torch.cat(out) * batch.response_mask


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float) -> torch.Tensor:
    """(B, T) fp32: the sequence score on each row's last response token, minus ``kl_coef * kl`` per token."""
    last = models.last_token_index(mask)  # (B,) index of the last response token
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores.float().to(mask.device)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl * mask
    return rewards


def ppo_loss(policy, value_model, mb: dict, cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Policy loss (+ KL term when not in the reward) + vf_coef * clipped value loss, and their stats."""
    pg, stats = actor.actor_loss_from_config(policy, mb, cfg, kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef)
    values = shifted_values(value_model, mb["input_ids"], mb["attention_mask"])
    vf, vstats = fa.value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], clip=cfg.cliprange_value,
                               agg=cfg.agg, norm_len=actor.norm_len(cfg), backend=cfg.backend)
    stats.update({f"value/{k}": v for k, v in vstats.items()}, policy_loss=pg.detach(), value_loss=vf.detach())
    return pg + cfg.vf_coef * vf, stats


def train(cfg: PPOConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}`` (the value model is
    saved in ``final_dir/value``)."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    policy = models.load_trainable(run.model_path, cfg, device=info.device)
    value_model = models.load_trainable(cfg.value_model or run.model_path, cfg, device=info.device, kind="score")
    examples, reward_fn = rollout.prompts_and_rewards(cfg, tokenizer, info.device)
    reference = ReferenceModel(cfg, run.model_path, info.device) if cfg.kl_coef or cfg.ref_model else None
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    in_use = rollout.RolloutInUse(cfg.num_iterations, info.device)
    loop = TrainLoop(cfg, policy, run, extra_models={"value": value_model}, extra_state={"sampler": sampler},
                     rank_state={"rollout": in_use})
    policy, value_model = loop.model, loop.models["value"]
    backend, sampling = generation_backends.build_sampler(cfg, policy, tokenizer, model_path=run.model_path)
    if loop.step_count:  # resumed: an engine holding its own weights starts from the checkpoint's
        backend.sync_weights(policy)
    rows_per_micro = cfg.batch_size * cfg.num_generations

    while not loop.done:
        if not in_use.pending:  # a resume inside a rollout continues the one in the checkpoint
            prompts = [examples[i] for _ in range(cfg.grad_accum) for i in sampler.next()]
            exp = rollout.collect(backend, tokenizer, prompts, group_size=cfg.num_generations, sampling=sampling,
                                  reward_fn=reward_fn)
            batch = exp.batch.to(info.device)
            mask = batch.response_mask
            per_row, kl = rollout.score_rollout(policy, reference, batch, temperature=cfg.temperature,
                                                fused=cfg.fused, micro_batch_size=rows_per_micro)  # kl: (B, T) k1
            old_values = rollout_values(value_model, batch, rows_per_micro)  # (B, T), no grad
            rewards_t = token_rewards(exp.rewards, mask, kl if cfg.kl_in_reward else None, cfg.kl_coef)
            advantages, returns = fa.gae(rewards_t, old_values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                         whiten=cfg.whiten_advantages)
            per_row.update(advantages=advantages, returns=returns, old_values=old_values)
            if exp.sampler_logprobs is not None:  # (B, T): the sampler's own, compared with (and correcting) old's
                per_row["sampler_logprobs"] = exp.sampler_logprobs.to(info.device)
            kl_seq = kl.sum(1) if kl is not None else None
            stats = {**rollout.rollout_metrics(exp, kl_seq), **rollout.off_policy_metrics(per_row, mask)}
            stats = distributed.mean_over_processes(stats, info)
            in_use.start(rollout.micro_batches(batch, per_row, rows_per_micro), stats)
        loop.step(in_use.take(), lambda mb: ppo_loss(policy, value_model, mb, cfg),
                  weight_fn=lambda mb: actor.loss_weight(mb, cfg.agg), extra_metrics=in_use.stats)
        if not in_use.pending and not loop.done:  # a finished rollout: the engine samples the next with these weights
            backend.sync_weights(policy)
    generation_backends.close(backend)
    return loop.finish()
