"""The actor (policy) loss GRPO and PPO share: the clipped policy gradient with optional KL and entropy terms.

Notation: for response token t of row b, ratio_t = pi(y_t | s_t) / pi_old(y_t | s_t) and advantage A (per sequence
or per token),
    l_t = max(-A ratio_t, -A clip(ratio_t, 1 - clip_low, 1 + clip_high))   [dual clip: min(l_t, -A c) for A < 0]
    loss = agg(l) + kl_coef * agg(KL_t(pi || ref)) - entropy_coef * agg(H_t)
with ``agg`` one of ``fastalign.reference.rl.AGG_MODES`` over the response mask.

Truncated importance sampling (``sampler_is_cap`` C; Yao et al. 2025, verl's TIS): when the tokens were drawn by
another engine (pi_sampler, e.g. vLLM) than the trainer's pi_old, l_t is weighted by w_t = min(pi_old / pi_sampler,
C), detached. l_t is positively homogeneous in A (both clip branches and the dual clip scale with it), so the
weight is applied as the per-token advantage w_t A: w_t l_t exactly, through the same fused op.
"""
from __future__ import annotations

import torch
from torch import nn

import fastalign as fa
from fastalign.reference.rl import aggregate
from fastalign.train import models


def actor_loss(model: nn.Module, mb: dict, *, fused: bool = True, clip_low: float = 0.2,
               clip_high: float | None = None, dual_clip: float | None = None, agg: str = "token-mean",
               norm_len: int | None = None, kl_coef: float = 0.0, kl_kind: str = "k3", entropy_coef: float = 0.0,
               temperature: float = 1.0, sampler_is_cap: float | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss of one micro-batch, and its stats.

    ``mb``: (b, t) ``input_ids``, ``attention_mask``, ``labels`` (-100 off the response), ``response_mask``,
    ``old_logprobs``, ``advantages`` ((b,) per sequence or (b, t) per token), optional ``ref_logprobs`` and
    ``sampler_logprobs`` (needed with ``sampler_is_cap``); token columns aligned with labels (column t scores
    ``input_ids[:, t]``).

    fused=True: ``fa.linear_policy_loss`` on the last hidden states and the LM head (no [b, t, V] logits).
    fused=False: full logits -> log-probs -> ``fa.ppo_policy_loss`` + KL and entropy terms, the reference.
    Both use an explicit ``norm_len`` so that "seq-mean-token-sum-norm" does not depend on the padded width.
    """
    labels, mask, old, adv = mb["labels"], mb["response_mask"], mb["old_logprobs"], mb["advantages"]
    ref = mb.get("ref_logprobs")
    if kl_coef and ref is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs in the micro-batch")
    is_stats = {}
    if sampler_is_cap is not None:
        if "sampler_logprobs" not in mb:
            raise ValueError("sampler_is_cap needs sampler_logprobs in the micro-batch (a backend that reports them)")
        weight = truncated_is_weights(old, mb["sampler_logprobs"], sampler_is_cap)
        adv = (adv[:, None] if adv.dim() == 1 else adv) * weight
        count = mask.sum().clamp(min=1)
        is_stats = {"sampler_is_weight": ((weight * mask).sum() / count).detach(),
                    "sampler_is_capped_frac": (((weight >= sampler_is_cap) & mask).sum() / count).detach()}
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

        loss, stats = models.forward_head(model, mb["input_ids"], mb["attention_mask"], fn)
        return loss, {**stats, **is_stats}
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
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(out.entropy, mask, agg, norm_len)
    # with entropy_coef 0 the entropy is a statistic only: no backward through the [b, t, V] softmax for it
    stats["entropy"] = ((out.entropy.detach() * mask).sum() / count)
    return loss, {**stats, **is_stats}


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """(b, t) fp32 min(exp(old - sampler), cap), detached: the truncated importance weight of each token drawn from
    the sampler, as an estimate under pi_old. Off the response both inputs are 0, giving weight 1."""
    return torch.exp(old_logprobs.detach().float() - sampler_logprobs.detach().float()).clamp(max=cap)


def actor_loss_from_config(model: nn.Module, mb: dict, cfg, *, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """:func:`actor_loss` with an RL config's settings (``config.RLConfig``); the per-token KL stat is renamed
    ``kl_token``: ``kl`` in the step metrics is the per-sequence KL at sampling time, which the monitor watches."""
    loss, stats = actor_loss(
        model, mb, fused=cfg.fused, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
        agg=cfg.agg, norm_len=norm_len(cfg), kl_coef=kl_coef, kl_kind=cfg.kl_kind,
        entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, sampler_is_cap=cfg.sampler_is_cap,
        backend=cfg.backend)
    if "kl" in stats:
        stats["kl_token"] = stats.pop("kl")
    return loss, stats


def norm_len(cfg) -> int | None:
    """The fixed length of "seq-mean-token-sum-norm" (``max_new_tokens``); None for the modes that take none."""
    return cfg.max_new_tokens if cfg.agg == "seq-mean-token-sum-norm" else None


def loss_weight(mb: dict, agg: str) -> torch.Tensor:
    """Units the micro-batch's actor loss is a mean over: response tokens for token-mean, else sequences."""
    return mb["response_mask"].sum() if agg == "token-mean" else torch.tensor(mb["input_ids"].shape[0])
