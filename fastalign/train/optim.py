"""The optimizer and the learning-rate schedule every trainer uses (``TrainLoop`` builds them from the config)."""
from __future__ import annotations

import math

import torch
from torch import nn


# devices whose AdamW has a fused kernel (one pass over each parameter instead of a dozen elementwise ops)
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def fused_adam_ok(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain (not DTensor/sharded) floating-point tensors,
    all on one device type that has the kernel. On CPU it is several times faster than the per-parameter loop
    (the default there) for a small model, where the optimizer is a large share of the step."""
    if not params:
        return False
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= set(FUSED_ADAM_DEVICES)
            and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point() for p in params))


def build_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms and biases); torch's fused kernel where it applies
    (:func:`fused_adam_ok`), as transformers' Trainer defaults to."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused_adam_ok(params) else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), **kwargs)


def build_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine / linear decay to 0 at ``max_steps``, or constant."""
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_scheduler == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
