"""A vLLM engine in the trainer's process (``--generation-backend vllm``; ``pip install 'fastalign[vllm]'``).

    backend = VLLMGenerationBackend(model_dir, eos_token_id=tok.eos_token_id, dtype=torch.bfloat16)
    backend.generate(prompt_ids, SamplingParams(...))   # -> Completions with the sampler's per-token log-probs
    backend.sync_weights(policy)                         # after each optimizer step: tensors, no disk

Colocated: the engine lives in this process (vLLM's in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
on this process's device, next to the trainer; under torchrun every rank holds its own engine and samples its own
share of the prompts. ``sync_weights`` streams :func:`fastalign.train.weight_sync.policy_weights` (FSDP2 shards
gathered one parameter at a time, LoRA merged) into vLLM's in-place reload, which processes one layer at a time,
then drops the prefix cache (its KV blocks were computed with the old weights).

On a GPU the engine takes ``gpu_memory_utilization`` of the card (or ``kv_cache_gb`` of KV cache) and with
``sleep=True`` frees its weights and KV cache between generation and the weight sync (vLLM sleep level 2: the
weights are about to be replaced anyway), so one card holds both. Log-probs are vLLM's ``processed_logprobs``:
those of the distribution it sampled from (after temperature, top-k and top-p), what an importance weight needs.

One engine per process at a time: ``close()`` tears down vLLM's process-wide state, so close one before starting
the next.
"""
from __future__ import annotations

import gc
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fastalign.train.generation import Completions, SamplingParams
from fastalign.train.weight_sync import policy_weights

INSTALL_HINT = "pip install 'fastalign[vllm]' (then uninstall torchvision if `import transformers` fails)"
_GIB = 1 << 30


def import_vllm():
    """``vllm``, or an ImportError that says how to install it and names the flag."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"--generation-backend vllm needs vLLM: {INSTALL_HINT}. ({exc})") from exc
    return vllm


class _KeepProcessState:
    """vLLM seeds the global RNGs and, on a CPU, pins torch to one thread and replaces ``torch.set_num_threads``
    with a no-op while it starts; the trainer's seeding and threads are restored afterwards."""

    def __enter__(self):
        self.rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.threads, self.set_threads = torch.get_num_threads(), torch.set_num_threads
        return self

    def __exit__(self, *exc):
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.random.set_rng_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        torch.set_num_threads = self.set_threads
        torch.set_num_threads(self.threads)
        return False


def _refresh_tied_head(model: nn.Module) -> None:
    """A tied LM head shares the embedding's weight, so the reload sends it nothing and leaves the head's own
    derived state alone: on a CPU that is a prepacked copy of the old weight (vLLM 0.32 packs it for oneDNN at load
    time). Re-run the head's post-load processing from the new, shared weight (a no-op where nothing is derived)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        return
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.quant_method.process_weights_after_loading(head)


class VLLMGenerationBackend:
    """An in-process ``vllm.LLM`` implementing :class:`~fastalign.train.generation.GenerationBackend`.

    Args:
        model_path: the checkpoint the engine starts from (the policy's initial weights).
        eos_token_id: generation stops at these ids (the EOS is kept in the completion).
        dtype: the engine's weights dtype; the trainer's, so synced weights are not rounded differently.
        seed: the engine's random stream (used when ``SamplingParams.seed`` is None); one per rank.
        max_model_len: longest prompt + completion the engine must hold.
        gpu_memory_utilization / kv_cache_gb: how much memory the engine takes (``kv_cache_gb`` sizes the KV cache
            directly and overrides the fraction).
        sleep: free the engine's memory between ``generate`` and the next ``sync_weights`` (GPU only).
        enforce_eager: no CUDA graphs / compilation.
        engine_kwargs: any other ``vllm.LLM`` argument.
    """

    def __init__(self, model_path: str | os.PathLike, *, eos_token_id: int | Sequence[int],
                 dtype: torch.dtype | str = "auto", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, kv_cache_gb: float | None = None, sleep: bool = False,
                 enforce_eager: bool = False, engine_kwargs: dict | None = None):
        if sleep and not torch.cuda.is_available():
            raise ValueError("--vllm-sleep needs a CUDA device: vLLM's sleep mode frees GPU memory, and its CPU "
                             "backend has none")
        # in-process: the weight sync hands tensors to the engine's model directly
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM's CPU backend would otherwise pin every OpenMP thread of this process, the trainer's too
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        vllm = import_vllm()
        self._vllm = vllm
        self.eos_ids = sorted({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
        self.sleep = sleep
        self._asleep = False
        kwargs = dict(model=str(Path(model_path)), dtype=str(dtype).removeprefix("torch."), seed=seed,
                      logprobs_mode="processed_logprobs", max_model_len=max_model_len,
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
                      enforce_eager=enforce_eager, disable_log_stats=True)
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * _GIB)
        kwargs.update(engine_kwargs or {})
        with _KeepProcessState():
            self.llm = vllm.LLM(**kwargs)

    # ------------------------------------------------------------------------------------------------ generate
    def _params(self, sampling: SamplingParams, index: int):
        greedy = sampling.greedy
        return self._vllm.SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
            seed=None if sampling.seed is None else sampling.seed + index, stop_token_ids=self.eos_ids,
            logprobs=0, detokenize=False)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Completions:
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep and its weights were released: call sync_weights(model) "
                               "before generating again")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: every prompt needs at least one token")
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        params = [self._params(sampling, i) for i in range(len(prompts))] if sampling.seed is not None \
            else self._params(sampling, 0)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        out = Completions([], [], [])
        for request in outputs:
            for sample in sorted(request.outputs, key=lambda c: c.index):
                ids = list(sample.token_ids)
                out.token_ids.append(ids)
                out.truncated.append(sample.finish_reason != "stop")
                out.logprobs.append([float(step[tok].logprob) for step, tok in zip(sample.logprobs, ids)])
        if self.sleep:
            self.llm.sleep(level=2)
            self._asleep = True
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[int]) -> torch.Tensor:
        """(B, K) float64: log p(token_ids[k] | prompt_ids[b]) from the engine's top ``top_logprobs`` next tokens
        (at temperature 1 with no top-p/top-k, so the processed log-probs are the model's own); NaN for a token
        outside that list. The engine must allow that many (``engine_kwargs={"max_logprobs": N}``)."""
        if self._asleep:
            raise RuntimeError("the vLLM engine is asleep: call sync_weights(model) before scoring")
        top = int(getattr(self, "top_logprobs", 20))
        params = self._vllm.SamplingParams(n=1, max_tokens=1, temperature=1.0, top_p=1.0, top_k=0, seed=0,
                                           logprobs=top, detokenize=False)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        rows = []
        for request in outputs:
            first = request.outputs[0].logprobs[0]  # {token id: Logprob} of the first generated position
            rows.append([float(first[t].logprob) if t in first else float("nan") for t in map(int, token_ids)])
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(token_ids))

    # ----------------------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        """Load the policy's current weights into the engine, in place, streamed one parameter at a time."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # memory for the weights only; the KV cache comes back after
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model),
                                                          "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_head)
        self.llm.reset_prefix_cache()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory (vLLM's process-wide state with it)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
