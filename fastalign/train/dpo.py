"""Direct preference optimisation (and its loss family: rDPO, IPO, SLiC hinge, SimPO).

Notation: pi(y|x), ref(y|x) = sums of token log-probs of response y under the policy and the frozen reference;
for pairs b with chosen y+ and rejected y-,
    u_b = beta * ((pi(y+_b) - ref(y+_b)) - (pi(y-_b) - ref(y-_b))),   loss = mean_b l(u_b)
with l from ``fa.dpo_loss`` (sigmoid: -log sigmoid(u)). ``fused=True`` computes it with ``fa.linear_dpo_loss``
from the policy's last hidden states (no [2B, T, V] logits, no per-token autograd graph); ``fused=False``
computes token log-probs from full logits, then ``fa.sequence_logprobs`` and ``fa.dpo_loss`` (the reference).

Reference log-probs: by default precomputed once, in a no-grad pass of the initial policy (or ``ref_model``)
before training; with LoRA and no ``ref_model`` the reference is the policy with its adapters disabled.
"""
from __future__ import annotations

import logging

import torch

import fastalign as fa
from fastalign.train import data, models
from fastalign.train.config import DPOConfig
from fastalign.train.loop import TrainLoop, prepare
from fastalign.train.ref_model import ReferenceModel

log = logging.getLogger("fastalign.train")


def _uses_lengths(cfg: DPOConfig) -> bool:
    return cfg.loss_type in ("ipo", "simpo")  # as fa.linear_dpo_loss's length_normalize=None default


@torch.no_grad()
def sequence_logps(model, batch: dict, cfg: DPOConfig) -> torch.Tensor:
    """(2B,) fp32 summed response log-probs of every row (no grad): the reference scores."""
    labels = batch["labels"]
    out = models.token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels, fused=cfg.fused,
                                backend=cfg.backend)
    return fa.sequence_logprobs(out.logprobs, data.response_mask(labels))


def _dpo_from_hidden(model, hidden, *, labels, ref_c, ref_r, cfg):
    weight, bias = models.lm_head_weight(model)
    # hidden[:, t] predicts labels[:, t + 1]
    return fa.linear_dpo_loss(hidden[:, :-1], weight, labels[:, 1:], ref_c, ref_r, bias=bias, beta=cfg.beta,
                              loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                              softcap=models.logit_softcap(model), ignore_index=data.IGNORE, backend=cfg.backend)


def dpo_loss(model, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """Mean pair loss of a (2B, T) micro-batch (chosen rows, then rejected) and its stats.
    ``batch["ref_chosen"]``/``["ref_rejected"]``: (B,) reference log-prob sums (absent for simpo)."""
    labels = batch["labels"]
    ref_c, ref_r = batch.get("ref_chosen"), batch.get("ref_rejected")
    if cfg.fused:
        fn = lambda m, h: _dpo_from_hidden(m, h, labels=labels, ref_c=ref_c, ref_r=ref_r, cfg=cfg)  # noqa: E731
        return models.forward_head(model, batch["input_ids"], batch["attention_mask"], fn)
    out = models.token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels, fused=False)
    mask = data.response_mask(labels)
    seq = fa.sequence_logprobs(out.logprobs, mask)  # (2B,)
    pairs = seq.shape[0] // 2
    lengths = mask.sum(-1) if _uses_lengths(cfg) else None
    return fa.dpo_loss(seq[:pairs], seq[pairs:], ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                       chosen_lengths=lengths[:pairs] if lengths is not None else None,
                       rejected_lengths=lengths[pairs:] if lengths is not None else None)


def train(cfg: DPOConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}``."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    model = models.load_trainable(run.model_path, cfg, device=info.device)
    rows = data.load_rows(cfg.train_file, "preference", max_samples=cfg.max_samples)
    examples = data.tokenize_preference(rows, tokenizer, max_length=cfg.max_length,
                                        max_prompt_length=cfg.max_prompt_length, chat_template=cfg.chat_template)
    pad = tokenizer.pad_token_id
    need_ref = cfg.loss_type != "simpo"
    reference = ReferenceModel(cfg, run.model_path, info.device,
                               scored_before_training=cfg.precompute_ref) if need_ref else None

    def to_device(batch):
        return {k: v.to(info.device) for k, v in batch.items()}

    if need_ref and cfg.precompute_ref:
        with reference.scoring(model) as ref_model:
            ref_model.eval()  # no dropout in the reference pass; TrainLoop puts the policy back in train mode
            for start in range(0, len(examples), cfg.batch_size):
                chunk = examples[start:start + cfg.batch_size]
                seq = sequence_logps(ref_model, to_device(data.collate_preference(chunk, pad)), cfg).cpu()
                for i, e in enumerate(chunk):
                    e["ref_chosen"], e["ref_rejected"] = float(seq[i]), float(seq[len(chunk) + i])
        log.info("reference log-probs precomputed for %d pairs", len(examples))
        reference = None  # frees a loaded reference copy
    sampler = data.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler})

    def micro_batch() -> dict:
        chunk = [examples[i] for i in sampler.next()]
        batch = to_device(data.collate_preference(chunk, pad))
        if need_ref and cfg.precompute_ref:
            batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in chunk], device=info.device)
            batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in chunk], device=info.device)
        elif need_ref:  # per-step reference: a loaded copy, or the (possibly wrapped) policy with adapters off
            with reference.scoring(loop.model) as ref_model:
                seq = sequence_logps(ref_model, batch, cfg)
            batch["ref_chosen"], batch["ref_rejected"] = seq[:len(chunk)], seq[len(chunk):]
        return batch

    while not loop.done:
        micro = [micro_batch() for _ in range(cfg.grad_accum)]
        loop.step(micro, lambda mb: dpo_loss(loop.model, mb, cfg), weight_fn=lambda mb: mb["input_ids"].shape[0] // 2)
    return loop.finish()
