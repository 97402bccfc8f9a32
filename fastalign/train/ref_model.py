"""The frozen reference policy pi_ref of the KL terms (GRPO, PPO) and of DPO, chosen by one rule:

    cfg.ref_model given            that checkpoint, loaded frozen (eval mode, no grad)
    LoRA and no ref_model          the policy itself with its adapters disabled: no second copy
    otherwise                      a frozen copy of the initial policy (the run's model path)

A trainer that takes every reference score before the policy's first update (DPO's precomputed pass) says so
with ``scored_before_training=True``: without ``ref_model`` the untrained policy then is the reference, so no copy
is loaded.

    reference = ReferenceModel(cfg, run.model_path, device)
    with reference.scoring(policy) as ref:        # ref: the module to score the reference with
        ref_logprobs = rollout.score_logprobs(ref, batch)
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import nn

from fastalign.train import models


class ReferenceModel:
    """The reference of ``cfg`` (a config with ``ref_model``, ``lora_r``, ``dtype``, ``attn_implementation``)."""

    def __init__(self, cfg, model_path: str | os.PathLike, device, *, scored_before_training: bool = False):
        self.adapters_off = cfg.ref_model is None and cfg.lora_r > 0
        self.model: nn.Module | None = None  # None: score through the policy passed to scoring()
        if not self.adapters_off and (cfg.ref_model is not None or not scored_before_training):
            self.model = models.load_model(cfg.ref_model or model_path, dtype=cfg.dtype, device=device,
                                           attn=cfg.attn_implementation)
            self.model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def scoring(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The module that computes reference scores: the frozen copy, or ``policy`` (wrapped or not) with its
        LoRA adapters disabled for the duration of the block, or the untrained ``policy`` as it is."""
        if self.model is not None:
            yield self.model
        elif self.adapters_off:
            with models.unwrap(policy, keep_peft=True).disable_adapter():
                yield policy
        else:
            yield policy
