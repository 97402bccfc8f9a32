"""The backend a config names, and the sampling options every backend maps: n completions per prompt
(prompt-major) and a seed, on the HF backend; the missing-vLLM error. Runs without vLLM."""
import sys

import pytest
import torch

from fastalign.train import generation, generation_backends, grpo, models
from fastalign.train.generation_http import OpenAIGenerationBackend


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return models.load_model(tiny_model_dir, dtype="float32")


def test_hf_backend_n_and_seed(policy, tiny_tokenizer):
    tok = tiny_tokenizer
    backend = generation.HFGenerationBackend(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = [tok("1+1=")["input_ids"], tok("22+3=")["input_ids"]]
    sampling = generation.SamplingParams(max_new_tokens=6, temperature=1.5, n=3, seed=7)
    state = torch.random.get_rng_state()
    out = backend.generate(prompts, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded call leaves the global stream alone
    assert len(out.token_ids) == 6 and out.logprobs is None
    again = backend.generate(prompts, sampling)
    assert again.token_ids == out.token_ids
    # prompt-major: rows 0-2 continue prompt 0, exactly as three copies of it would
    copies = generation.SamplingParams(max_new_tokens=6, temperature=1.5, seed=7)
    assert backend.generate([prompts[0]] * 3 + [prompts[1]] * 3, copies).token_ids == out.token_ids
    assert len({tuple(t) for t in out.token_ids[:3]}) > 1  # the copies are sampled, not repeated
    with pytest.raises(ValueError, match="n must be >= 1"):
        generation.SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        generation.SamplingParams(top_k=-1)


def test_build_sampler_picks_the_configured_backend(policy, tiny_tokenizer):
    cfg = grpo.GRPOConfig(max_new_tokens=5, temperature=0.8, top_k=4, generation_batch_size=3)
    backend, sampling = generation_backends.build_sampler(cfg, policy, tiny_tokenizer)
    assert isinstance(backend, generation.HFGenerationBackend) and backend.batch_size == 3
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_k) == (5, 0.8, 4)
    generation_backends.close(backend)  # nothing to release
    cfg = grpo.GRPOConfig(generation_backend="openai", base_url="http://127.0.0.1:9/v1", allow_stale_weights=True,
                          served_model="m", request_timeout=7.0, request_retries=1)
    backend, _ = generation_backends.build_sampler(cfg, policy, tiny_tokenizer)  # no request until generate
    assert isinstance(backend, OpenAIGenerationBackend) and isinstance(backend, generation.GenerationBackend)
    assert (backend.base_url, backend.model, backend.timeout, backend.retries) == ("http://127.0.0.1:9/v1", "m", 7.0, 1)
    assert backend.eos_ids == [tiny_tokenizer.eos_token_id]


def test_vllm_backend_without_vllm_says_how_to_install(tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the backend sets it: restored afterwards
    cfg = grpo.GRPOConfig(generation_backend="vllm", model=str(tiny_model_dir))
    policy = models.load_model(tiny_model_dir, dtype="float32")
    with pytest.raises(ImportError, match=r"--generation-backend vllm needs vLLM: pip install 'fastalign\[vllm\]'"):
        generation_backends.build_sampler(cfg, policy, tiny_tokenizer, model_path=tiny_model_dir)


def test_vllm_sleep_needs_a_gpu(tiny_model_dir, monkeypatch):
    from fastalign.train.generation_vllm import VLLMGenerationBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--vllm-sleep needs a CUDA device"):
        VLLMGenerationBackend(tiny_model_dir, eos_token_id=2, sleep=True)
