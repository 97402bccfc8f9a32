"""The generation backend an RL config names (``--generation-backend hf|vllm|openai``), built for a trainer.

    backend, sampling = build_sampler(cfg, policy, tokenizer, model_path=run.model_path)
    ... backend.generate(prompt_ids, sampling) ... backend.sync_weights(policy) ...
    close(backend)
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from fastalign.train import models
from fastalign.train.generation import GenerationBackend, HFGenerationBackend, SamplingParams
from fastalign.train.generation_http import OpenAIGenerationBackend
from fastalign.train.generation_vllm import VLLMGenerationBackend


def build_sampler(cfg, model: nn.Module, tokenizer, *, model_path=None) -> tuple[GenerationBackend, SamplingParams]:
    """The backend ``cfg.generation_backend`` names and the sampling settings of an RL config
    (``config.RLConfig``). ``model`` is the policy (the HF backend samples from it); ``model_path`` the checkpoint
    a vLLM engine loads before its first weight sync."""
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k)
    eos = tokenizer.eos_token_id
    kind = getattr(cfg, "generation_backend", "hf")
    if kind == "hf":
        return HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                   batch_size=cfg.generation_batch_size), sampling
    if kind == "vllm":
        if model_path is None:
            raise ValueError("--generation-backend vllm: build_sampler needs model_path (the checkpoint to load)")
        device = next(models.unwrap(model).parameters()).device
        return VLLMGenerationBackend(
            model_path, eos_token_id=eos, dtype=models.resolve_dtype(cfg.dtype, device), seed=cfg.seed + _rank(),
            max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gb=cfg.vllm_kv_cache_gb,
            sleep=cfg.vllm_sleep, enforce_eager=cfg.vllm_enforce_eager), sampling
    if kind == "openai":
        return OpenAIGenerationBackend(
            cfg.base_url, eos_token_id=eos, model=cfg.served_model, batch_size=cfg.generation_batch_size,
            timeout=cfg.request_timeout, retries=cfg.request_retries,
            allow_stale_weights=cfg.allow_stale_weights), sampling
    raise ValueError(f"--generation-backend must be hf, vllm or openai; got {kind!r}")


def close(backend: GenerationBackend) -> None:
    """Release an engine's resources (a vLLM engine's memory); backends without ``close`` need none."""
    if hasattr(backend, "close"):
        backend.close()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
