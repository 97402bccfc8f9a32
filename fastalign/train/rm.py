"""Reward model: Bradley-Terry on a scalar head (AutoModelForSequenceClassification, one label).

Notation: r(x, y) = the head's output at the last token of prompt x + response y; for pairs b with chosen y+
and rejected y-, and an optional margin m_b,
    loss = -(1 / B) * sum_b log sigmoid(r(x_b, y+_b) - r(x_b, y-_b) - m_b)  [+ c * mean((r+ + r-)^2)]
over the B pairs of the global batch (``fa.reward_loss``; ``--no-fused`` computes the same in plain PyTorch).
Rows with a soft ``label`` (p(chosen is preferred)) train the soft-target form, :func:`soft_reward_loss`.

The trained model in ``RUN_DIR/final`` loads with ``models.load_model(path, kind="score")`` and scores
sequences with ``models.sequence_scores``: that is what GRPO/PPO use as a learned reward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastalign as fa
from fastalign.train import batching, data, models
from fastalign.train.config import RMConfig
from fastalign.train.loop import TrainLoop, prepare


def reward_loss_reference(chosen, rejected, margin=None, center_rewards_coef=0.0):
    """The plain-PyTorch Bradley-Terry loss, the reference for ``fa.reward_loss``."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((chosen + rejected) ** 2).mean()
    stats = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
             "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean()}
    return loss, {k: v.detach() for k, v in stats.items()}


def soft_reward_loss(chosen, rejected, label, center_rewards_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry with a per-pair soft target (a preference row's ``label``, see ``data.LABEL``).

    Notation: label_b = p(y+_b is preferred) in [0, 1], d_b = r(x_b, y+_b) - r(x_b, y-_b),
        loss = mean_b [ -label_b * log sigmoid(d_b) - (1 - label_b) * log sigmoid(-d_b) ]  [+ c * mean((r+ + r-)^2)]
    All inputs (B,) float; with every label_b = 1 this is the plain loss of :func:`reward_loss_reference`.
    """
    diff = chosen - rejected
    label = label.to(diff.dtype)
    loss = (-label * F.logsigmoid(diff) - (1 - label) * F.logsigmoid(-diff)).mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((chosen + rejected) ** 2).mean()
    return loss


def rm_loss(model, batch: dict, cfg: RMConfig) -> tuple[torch.Tensor, dict]:
    """batch: (2B, T) chosen rows then rejected rows; returns the mean pair loss and its stats."""
    scores = models.sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,) fp32
    pairs = scores.shape[0] // 2
    chosen, rejected = scores[:pairs], scores[pairs:]
    if "label" in batch:  # per-pair soft labels
        stats = reward_loss_reference(chosen.detach(), rejected.detach())[1]
        return soft_reward_loss(chosen, rejected, batch["label"], cfg.center_rewards_coef), stats
    margin = batch.get("margin")
    if cfg.fused:
        return fa.reward_loss(chosen, rejected, margin=margin, center_rewards_coef=cfg.center_rewards_coef or None)
    return reward_loss_reference(chosen, rejected, margin, cfg.center_rewards_coef)


def train(cfg: RMConfig) -> dict:
    """Train with ``cfg``; returns ``{"run_dir", "final_dir", "history", "bad_steps"}``."""
    run = prepare(cfg)
    tokenizer, info = run.tokenizer, run.info
    model = models.load_trainable(run.model_path, cfg, device=info.device, kind="score")
    rows = data.load_rows(cfg.train_file, "preference", max_samples=cfg.max_samples, tokenizer=tokenizer,
                          chat_template=cfg.chat_template)
    extra = (cfg.margin_column,) if cfg.margin_column else ()
    if cfg.margin_column and cfg.margin_column not in rows.column_names:
        raise data.DataError(f"margin_column {cfg.margin_column!r} is not a column of the data ({rows.column_names})")
    soft = data.LABEL in rows.column_names  # per-pair soft labels
    if soft and cfg.margin_column:
        raise data.DataError(f"{cfg.train_file}: rows with a {data.LABEL!r} field train a soft Bradley-Terry "
                             "target, which margin_column does not combine with")
    extra += (data.LABEL,) if soft else ()
    examples = data.tokenize_preference(rows, tokenizer, max_length=cfg.max_length,
                                        max_prompt_length=cfg.max_prompt_length, chat_template=cfg.chat_template,
                                        extra_columns=extra)
    sampler = batching.Sampler(len(examples), cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    loop = TrainLoop(cfg, model, run, extra_state={"sampler": sampler})

    def micro_batch() -> dict:
        chunk = [examples[i] for i in sampler.next()]
        batch = batching.collate_preference(chunk, tokenizer.pad_token_id)
        if cfg.margin_column:
            batch["margin"] = torch.tensor([float(e[cfg.margin_column]) for e in chunk])
        if soft:
            batch["label"] = data.soft_labels(chunk)
        return {k: v.to(info.device) for k, v in batch.items()}

    while not loop.done:
        micro = [micro_batch() for _ in range(cfg.grad_accum)]
        loop.step(micro, lambda mb: rm_loss(loop.model, mb, cfg), weight_fn=lambda mb: mb["input_ids"].shape[0] // 2)
    return loop.finish()
