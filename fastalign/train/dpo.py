"""Direct preference optimisation and its loss family: every loss type of TRL 1.16's DPOTrainer, SimPO, and
weighted combinations of them (``loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]``: MPO).

Notation: pi(y|x), ref(y|x) = sums of token log-probs of response y under the policy and the frozen reference;
for pairs b with chosen y+ and rejected y-,
    u_b = beta * ((pi(y+_b) - ref(y+_b)) - (pi(y-_b) - ref(y-_b))),   loss = sum_k w_k mean_b l_k(...)
with each l_k from ``fa.dpo_loss`` (sigmoid: -log sigmoid(u)). ``fused=True`` computes it with ``fa.linear_dpo_loss``
from the policy's last hidden states (no [2B, T, V] logits, no per-token autograd graph); ``fused=False``
computes token log-probs from full logits, then ``fa.sequence_logprobs`` and ``fa.dpo_loss`` (the reference).

Rows with a soft ``label`` (p(chosen is preferred), e.g. from ``fastalign cai label``) train with per-pair cDPO
smoothing eps_b = 1 - label_b (:func:`soft_dpo_loss`).

Reference log-probs: by default precomputed once, in a no-grad pass of the initial policy (or ``ref_model``)
before training; with LoRA and no ``ref_model`` the reference is the policy with its adapters disabled.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import fastalign as fa
from fastalign.train import batching, data, models
from fastalign.train.config import DPOConfig
from fastalign.train.loop import TrainLoop, prepare
from fastalign.reference.preference import needs_reference, normalizes
from fastalign.train.ref_model import ReferenceModel

log = logging.getLogger("fastalign.train")


def _uses_lengths(cfg: DPOConfig) -> bool:
    # as fa.linear_dpo_loss's length_normalize=None default: sft counts tokens, the others divide by the lengths
    return any(t == "sft" or normalizes(t, None) for t in cfg.loss_type)


def _loss_options(cfg: DPOConfig) -> dict:
    """The loss keyword arguments of fa.dpo_loss / fa.linear_dpo_loss for ``cfg``."""
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, loss_weights=cfg.loss_weights or None,
                label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                discopop_tau=cfg.discopop_tau if "discopop" in cfg.loss_type else None)


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
    return fa.linear_dpo_loss(hidden[:, :-1], weight, labels[:, 1:], ref_c, ref_r, bias=bias, **_loss_options(cfg),
                              softcap=models.logit_softcap(model), ignore_index=data.IGNORE, backend=cfg.backend)


def dpo_loss(model, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """Mean pair loss of a (2B, T) micro-batch (chosen rows, then rejected) and its stats.
    ``batch["ref_chosen"]``/``["ref_rejected"]``: (B,) reference log-prob sums (absent for reference-free
    types: simpo, sft)."""
    if "label" in batch:  # per-pair soft labels
        return soft_label_dpo_loss(model, batch, cfg)
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
    return fa.dpo_loss(seq[:pairs], seq[pairs:], ref_c, ref_r, **_loss_options(cfg),
                       chosen_lengths=lengths[:pairs] if lengths is not None else None,
                       rejected_lengths=lengths[pairs:] if lengths is not None else None)


# ------------------------------------------------- per-pair soft labels (a preference row's 'label', see data.LABEL)

def soft_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, label, *, beta: float) -> torch.Tensor:
    """Sigmoid DPO with a per-pair label: cDPO whose smoothing eps_b = 1 - label_b varies by pair.

    Notation: label_b = p(y+_b is preferred) in [0, 1], u_b = beta * ((pi(y+_b) - ref(y+_b)) - (pi(y-_b) - ref(y-_b))),
        loss = mean_b [ -label_b * log sigmoid(u_b) - (1 - label_b) * log sigmoid(-u_b) ]
    All inputs (B,) float. With every label_b = 1 - eps this is ``fa.dpo_loss(..., label_smoothing=eps)``.
    (``fa.dpo_loss`` takes one scalar eps, so the per-pair form is computed here.)
    """
    u = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    label = label.to(u.dtype)
    return (-label * F.logsigmoid(u) - (1 - label) * F.logsigmoid(-u)).mean()


def soft_label_dpo_loss(model, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict]:
    """:func:`soft_dpo_loss` of a micro-batch; sequence log-probs fused (``fa.linear_sequence_logprobs``) or not."""
    labels = batch["labels"]

    def loss_and_stats(seq):
        pairs = seq.shape[0] // 2
        args = (batch["ref_chosen"], batch["ref_rejected"])
        loss = soft_dpo_loss(seq[:pairs], seq[pairs:], *args, batch["label"], beta=cfg.beta)
        _, stats = fa.dpo_loss(seq[:pairs].detach(), seq[pairs:].detach(), *args, beta=cfg.beta)
        return loss, stats

    if cfg.fused:
        def fn(m, hidden):
            weight, bias = models.lm_head_weight(m)
            return loss_and_stats(fa.linear_sequence_logprobs(
                hidden[:, :-1], weight, labels[:, 1:], bias=bias, softcap=models.logit_softcap(m),
                ignore_index=data.IGNORE, backend=cfg.backend))

        return models.forward_head(model, batch["input_ids"], batch["attention_mask"], fn)
    out = models.token_logprobs(model, batch["input_ids"], batch["attention_mask"], labels, fused=False)
    return loss_and_stats(fa.sequence_logprobs(out.logprobs, data.response_mask(labels)))


def train(cfg: DPOConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}``."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    model = models.load_trainable(run.model_path, cfg, device=info.device)
    rows = data.load_rows(cfg.train_file, "preference", max_samples=cfg.max_samples, tokenizer=tokenizer,
                          chat_template=cfg.chat_template)
    soft = data.LABEL in rows.column_names  # per-pair soft labels
    if soft and (cfg.loss_type != ["sigmoid"] or cfg.label_smoothing):
        raise data.DataError(f"{cfg.train_file}: rows with a {data.LABEL!r} field set label smoothing per pair; "
                             "they need loss_type sigmoid and label_smoothing 0")
    examples = data.tokenize_preference(rows, tokenizer, max_length=cfg.max_length,
                                        max_prompt_length=cfg.max_prompt_length, chat_template=cfg.chat_template,
                                        extra_columns=(data.LABEL,) if soft else ())
    if soft:
        log.info("soft labels: per-pair cDPO with eps = 1 - %r (mean label %.3f)", data.LABEL,
                 float(data.soft_labels(examples).mean()))
    pad = tokenizer.pad_token_id
    need_ref = needs_reference(cfg.loss_type)
    reference = ReferenceModel(cfg, run.model_path, info.device,
                               scored_before_training=cfg.precompute_ref) if need_ref else None

    def to_device(batch):
        return {k: v.to(info.device) for k, v in batch.items()}

    if need_ref and cfg.precompute_ref:
        with reference.scoring(model) as ref_model:
            ref_model.eval()  # no dropout in the reference pass; TrainLoop puts the policy back in train mode
            for start in range(0, len(examples), cfg.batch_size):
                chunk = examples[start:start + cfg.batch_size]
                seq = sequence_logps(ref_model, to_device(batching.collate_preference(chunk, pad)), cfg).cpu()
                for i, e in enumerate(chunk):
                    e["ref_chosen"], e["ref_rejected"] = float(seq[i]), float(seq[len(chunk) + i])
        log.info("reference log-probs precomputed for %d pairs", len(examples))
        reference = None  # frees a loaded reference copy
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler})

    def micro_batch() -> dict:
        chunk = [examples[i] for i in sampler.next()]
        batch = to_device(batching.collate_preference(chunk, pad))
        if soft:
            batch["label"] = data.soft_labels(chunk).to(info.device)
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
