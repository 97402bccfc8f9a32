"""Supervised fine-tuning: token-level NLL of completions (or whole rows), from hidden states.

Notation: for row b and position t with label y_bt (IGNORE on prompt and padding),
    loss = -(1 / N) * sum_{b,t: y_bt != IGNORE} log p(y_bt | x_b,<t),   N = the number of trained tokens
in the global batch (all micro-batches and processes). log p comes from ``fa.linear_logprobs`` on the last
hidden states and the LM-head weight (``fused=True``), or from full logits (``fused=False``, the reference).

Python: ``fastalign.train.sft.train(SFTConfig(...))``; CLI: ``fastalign train sft [--config c.yaml] [--flags]``.
"""
from __future__ import annotations

import logging

import torch

from fastalign.train import batching, data, models
from fastalign.train.config import SFTConfig
from fastalign.train.loop import TrainLoop, prepare

log = logging.getLogger("fastalign.train")


def sft_loss(model, batch: dict, cfg: SFTConfig) -> tuple[torch.Tensor, dict]:
    """Mean NLL over the micro-batch's trained tokens, and its stats. batch: (B, T) input_ids,
    attention_mask, labels."""
    labels = batch["labels"]
    valid = data.response_mask(labels)
    out = models.token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels.masked_fill(~valid,
                                data.IGNORE), fused=cfg.fused, backend=cfg.backend)
    count = valid.sum().clamp(min=1)
    nll = -(out.logprobs * valid).sum() / count  # (B, T) fp32 -> scalar
    return nll, {"nll": nll.detach()}


def build_examples(cfg: SFTConfig, tokenizer) -> list[dict]:
    rows = data.load_rows(cfg.train_file, "sft", max_samples=cfg.max_samples, tokenizer=tokenizer,
                          chat_template=cfg.chat_template)
    examples = data.tokenize_sft(rows, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                 chat_template=cfg.chat_template, completion_only_loss=cfg.completion_only_loss)
    if cfg.packing:
        packed = batching.pack_sft(examples, cfg.max_length)
        log.info("packing: %d examples into %d rows of up to %d tokens", len(examples), len(packed), cfg.max_length)
        examples = packed
    return examples


def train(cfg: SFTConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}`` (see TrainLoop.finish)."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    model = models.load_trainable(run.model_path, cfg, device=info.device)
    examples = build_examples(cfg, tokenizer)
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler})

    def micro_batch() -> dict:
        batch = batching.collate_sft([examples[i] for i in sampler.next()], tokenizer.pad_token_id)
        return {k: v.to(info.device) for k, v in batch.items()}

    while not loop.done:
        micro = [micro_batch() for _ in range(cfg.grad_accum)]
        loop.step(micro, lambda mb: sft_loss(loop.model, mb, cfg),
                  weight_fn=lambda mb: data.response_mask(mb["labels"]).sum())
    return loop.finish()
