"""GRPO (Shao et al. 2024) and its variants: Dr. GRPO (Liu et al. 2025) and DAPO's clip-higher and token-level
loss (Yu et al. 2025), through options.

Notation: for each prompt x_g, G completions y_g1..y_gG are sampled from the current policy; r_gi is their
reward (weighted rule-based functions and/or a reward model); the group advantage is
    A_gi = (r_gi - mean_i r_gi) / (std_i r_gi + eps)          scale_rewards="group" (GRPO)
    A_gi =  r_gi - mean_i r_gi                                 scale_rewards="none"  (Dr. GRPO)
and every token t of y_gi gets A_gi. With ratio_t = pi(y_t | .) / pi_old(y_t | .),
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - clip_low, 1 + clip_high)) + kl_coef * KL_t(pi || ref)
aggregated over response tokens by ``agg``: token-mean (DAPO), seq-mean-token-mean (the GRPO paper),
seq-mean-token-sum-norm (Dr. GRPO: sum / (B * max_new_tokens)). pi_old's log-probs are recomputed by our forward
(``fa.linear_logprobs``) at sampling time; ``num_iterations`` > 1 reuses each rollout for several steps.

``fused=True``: ``fa.linear_policy_loss`` from the last hidden states (no [B, T, V] logits); ``fused=False``: full
logits, then ``fa.ppo_policy_loss`` (the reference path).

Python: ``fastalign.train.grpo.train(GRPOConfig(...))``; CLI: ``fastalign train grpo [--config c.yaml] [--flags]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import fastalign as fa
from fastalign.reference.rl import AGG_MODES
from fastalign.train import actor, batching, distributed, generation_backends, metrics, models, rollout
from fastalign.train.config import RLConfig, RUN_DIR_HELP
from fastalign.train.config_parsing import option, require
from fastalign.train.loop import TrainLoop, prepare
from fastalign.train.ref_model import ReferenceModel


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: G sampled completions per prompt, group-relative advantages, clipped policy gradient."""

    output_dir: str = option("runs/grpo", RUN_DIR_HELP)
    batch_size: int = option(4, "prompts per micro-batch, per process (each gives num_generations sequences)")
    num_generations: int = option(8, "G: completions sampled per prompt (the group)")
    generation_batch_size: int | None = option(None, "prompts x G sequences per generate call; none: all")
    scale_rewards: str = option("group", "advantage scaling: group (GRPO), none (Dr. GRPO), rloo, batch",
                                choices=("group", "none", "rloo", "batch"))
    agg: str = option("token-mean", "loss aggregation: token-mean (DAPO), seq-mean-token-mean (GRPO paper), "
                                    "seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)", choices=AGG_MODES)
    kl_coef: float = option(0.0, "beta: weight of the KL(pi || ref) loss term (0: no reference model needed)")
    num_iterations: int = option(1, "optimizer steps per rollout batch (mu); > 1 makes the clip active")
    warn_uniform_groups: int | None = option(5, "warn when every group's rewards are equal (no signal) for this "
                                                "many steps running; none: never")

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:  # every scale centres on the group mean: a group of one gives zero advantages
            raise ValueError(f"GRPOConfig: num_generations must be >= 2 (a group of one has no baseline), "
                             f"got {self.num_generations}")
        require(self, "warn_uniform_groups", 1)


def rollout_metrics(exp: rollout.Experience, group_size: int, kl_seq) -> dict[str, float]:
    """``rollout.rollout_metrics``, plus the reward's spread and the fraction of groups whose rewards are all equal
    (they carry no GRPO signal)."""
    grouped = exp.rewards.view(-1, group_size)
    group_stats = {"reward_std": exp.rewards.std() if len(exp.rewards) > 1 else 0.0,
                   "uniform_group_frac": (grouped.max(1).values == grouped.min(1).values).float().mean()}
    return {**rollout.rollout_metrics(exp, kl_seq), **{k: metrics.to_float(v) for k, v in group_stats.items()}}


def train(cfg: GRPOConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}``."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    model = models.load_trainable(run.model_path, cfg, device=info.device)
    examples, reward_fn = rollout.prompts_and_rewards(cfg, tokenizer, info.device)
    # the reference is needed for the KL term, and worth logging whenever one is named
    reference = ReferenceModel(cfg, run.model_path, info.device) if cfg.kl_coef or cfg.ref_model else None
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    in_use = rollout.RolloutInUse(cfg.num_iterations, info.device)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler}, rank_state={"rollout": in_use})
    backend, sampling = generation_backends.build_sampler(cfg, loop.model, tokenizer, model_path=run.model_path)
    if loop.step_count:  # resumed: an engine holding its own weights starts from the checkpoint's
        backend.sync_weights(loop.model)
    group, rows_per_micro = cfg.num_generations, cfg.batch_size * cfg.num_generations

    while not loop.done:
        if not in_use.pending:  # a resume inside a rollout continues the one in the checkpoint
            prompts = [examples[i] for _ in range(cfg.grad_accum) for i in sampler.next()]
            exp = rollout.collect(backend, tokenizer, prompts, group_size=group, sampling=sampling,
                                  reward_fn=reward_fn)
            batch = exp.batch.to(info.device)
            per_row, kl = rollout.score_rollout(loop.model, reference, batch, temperature=cfg.temperature,
                                                fused=cfg.fused, micro_batch_size=rows_per_micro)
            per_row["advantages"] = fa.group_advantages(exp.rewards, group,
                                                        scale=cfg.scale_rewards).to(info.device)  # (B,)
            if exp.sampler_logprobs is not None:  # (B, T): the sampler's own, compared with (and correcting) old's
                per_row["sampler_logprobs"] = exp.sampler_logprobs.to(info.device)
            kl_seq = kl.sum(1).cpu() if kl is not None else None
            stats = {**rollout_metrics(exp, group, kl_seq), **rollout.off_policy_metrics(per_row, batch.response_mask)}
            stats = distributed.mean_over_processes(stats, info)
            in_use.start(rollout.micro_batches(batch, per_row, rows_per_micro), stats)
        loop.step(in_use.take(), lambda mb: actor.actor_loss_from_config(loop.model, mb, cfg, kl_coef=cfg.kl_coef),
                  weight_fn=lambda mb: actor.loss_weight(mb, cfg.agg), extra_metrics=in_use.stats)
        if not in_use.pending and not loop.done:  # a finished rollout: the engine samples the next with these weights
            backend.sync_weights(loop.model)
    generation_backends.close(backend)
    return loop.finish()
