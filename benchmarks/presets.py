"""Shapes. Heads from a small registry of real models; presets sized for CI, a 2-core CPU, and one H100/H200.

- ``ci``: tiny shapes, every case and every available implementation, agreement checked; seconds.
- ``cpu``: small shapes that finish in a couple of minutes on 2 cores, plus a small N/V sweep for the plots.
- ``gpu``: the shapes of the GPU targets in docs/architecture.md (*Targets*) — linear_logprobs at
  (32768, 3584, 151936) and (8192, 4096, 128256) in bf16, DPO 8 pairs x 2048 tokens and GRPO 16 x 2048 on a
  Qwen2.5-7B head, GAE/PPO/value/KL at 512x2048 and 1024x4096, the e2e DPO/GRPO step on a Qwen2.5-0.5B-shaped
  model at 8 x 1024 tokens — plus an N and a V sweep.
"""
from __future__ import annotations

import torch

HEADS = {  # name: (D, V)
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 151936),
    "qwen2.5-0.5b": (896, 151936),
}

bf16, fp32 = torch.bfloat16, torch.float32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}  # --dtype


def _lp(n, head=None, d=None, v=None, dtype=bf16, **kw):
    if head:
        d, v = HEADS[head]
    return dict(n=n, d=d, v=v, dtype=dtype, head=head, **kw)


PRESETS: dict[str, dict] = {
    "ci": {
        "device": "cpu",
        "logprobs": [_lp(96, d=32, v=1007, dtype=fp32)],
        "logprobs_sweep": [_lp(n, d=32, v=1007, dtype=fp32, modes=("fwd_bwd",)) for n in (32, 64)],
        "dpo": [dict(pairs=2, t=16, d=32, v=1007, dtype=fp32)],
        "grpo": [dict(b=4, t=16, d=32, v=1007, dtype=fp32)],
        "gae": [dict(b=4, t=64)],
        "ppo": [dict(b=4, t=64)],
        "e2e_dpo": [dict(model="tiny-llama", d=32, v=1007, layers=1, pairs=2, t=16, dtype=fp32)],
        "e2e_grpo": [dict(model="tiny-llama", d=32, v=1007, layers=1, b=4, t=16, dtype=fp32)],
        "e2e_sft": [dict(model="tiny-llama", d=32, v=1007, layers=1, b=4, t=16, dtype=fp32)],
        "compile": False, "budget_s": 0.05, "impl_timeout_s": 60, "build_ext": False,
    },
    "cpu": {
        "device": "cpu",
        "logprobs": [_lp(512, d=128, v=8000, dtype=fp32)],
        "logprobs_sweep": [_lp(n, d=128, v=8000, dtype=fp32, modes=("fwd_bwd",)) for n in (128, 256, 1024)]
        + [_lp(512, d=128, v=v, dtype=fp32, modes=("fwd_bwd",), sweep="V") for v in (2000, 4000, 16000)],
        "dpo": [dict(pairs=2, t=128, d=128, v=8000, dtype=fp32)],
        "grpo": [dict(b=4, t=128, d=128, v=8000, dtype=fp32)],
        "gae": [dict(b=64, t=512), dict(b=256, t=1024)],
        "ppo": [dict(b=64, t=512), dict(b=256, t=1024)],
        "e2e_dpo": [dict(model="tiny-llama", d=128, v=8000, layers=2, pairs=2, t=128, dtype=fp32)],
        "e2e_grpo": [dict(model="tiny-llama", d=128, v=8000, layers=2, b=4, t=128, dtype=fp32)],
        "e2e_sft": [dict(model="tiny-llama", d=128, v=8000, layers=2, b=4, t=128, dtype=fp32)],
        "compile": True, "budget_s": 1.0, "impl_timeout_s": 120, "build_ext": True,
    },
    "gpu": {
        "device": "cuda",
        "logprobs": [_lp(32768, "qwen2.5-7b"), _lp(8192, "llama3-8b")],
        "logprobs_sweep": [_lp(n, "qwen2.5-7b", modes=("fwd_bwd",), check=False) for n in (2048, 8192, 16384)]
        + [_lp(8192, d=3584, v=v, modes=("fwd_bwd",), check=False, sweep="V") for v in (32000, 65536, 262144)],
        "dpo": [dict(pairs=8, t=2048, d=3584, v=151936, dtype=bf16, head="qwen2.5-7b")],
        "grpo": [dict(b=16, t=2048, d=3584, v=151936, dtype=bf16, head="qwen2.5-7b")],
        "gae": [dict(b=512, t=2048), dict(b=1024, t=4096)],
        "ppo": [dict(b=512, t=2048), dict(b=1024, t=4096)],
        "e2e_dpo": [dict(model="qwen2.5-0.5b", pairs=4, t=1024, dtype=bf16)],
        "e2e_grpo": [dict(model="qwen2.5-0.5b", b=8, t=1024, dtype=bf16)],
        "e2e_sft": [dict(model="qwen2.5-0.5b", b=8, t=1024, dtype=bf16)],
        # torch.compile rows: PPO/value/KL (the PPO target in docs/architecture.md, *Targets*, is against it); not
        # CCE's torch_compile impl at 32768 x 151936, which materialises the logits and spends the lease compiling
        "compile": True, "compile_logprobs": False, "budget_s": 0.4, "impl_timeout_s": 60, "build_ext": True,
    },
}

CASE_KEYS = {  # --cases names -> preset keys
    "linear_logprobs": ("logprobs", "logprobs_sweep"),
    "dpo": ("dpo",), "grpo": ("grpo",), "gae": ("gae",), "ppo": ("ppo",), "value_loss": ("ppo",),
    "kl_penalty": ("ppo",),
    "dpo_step": ("e2e_dpo",), "grpo_step": ("e2e_grpo",),
    "trl_dpo_step": ("e2e_dpo",), "trl_grpo_step": ("e2e_grpo",), "hf_sft_step": ("e2e_sft",),
}
SUITES = {"ops": ("linear_logprobs", "dpo", "grpo", "gae", "ppo", "value_loss", "kl_penalty"),
          "e2e": ("dpo_step", "grpo_step", "trl_dpo_step", "trl_grpo_step", "hf_sft_step")}
