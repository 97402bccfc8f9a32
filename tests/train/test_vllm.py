"""vLLM as the rollout engine, for real, on a tiny head_dim-64 Llama (vLLM's CPU attention refuses head_dim 16):
the sampling options it maps, its log-probs against the trainer's own forward, the weight sync after an optimizer
step (full weights and LoRA), GRPO and PPO runs with ``--generation-backend vllm``, and the HTTP backend against a
real vLLM OpenAI server on loopback (the session's ``vllm_server``, tests/conftest.py, which the feedback tools'
live test shares). Marked ``vllm``: skipped where vLLM is not installed.

One in-process engine at a time (closing one tears down vLLM's process-wide state): each test starts its own and
closes it. The first start in a process pays vLLM's imports (~20 s); later ones take a few seconds.
"""
import os

import pytest
import torch

from fastalign.train import actor, generation, grpo, models, ppo, rewards, rollout
from fastalign.train.generation_http import OpenAIGenerationBackend

pytestmark = pytest.mark.vllm

KV_CACHE_GB = 1 / 16  # 64 MiB: vLLM on a CPU otherwise reserves a fraction of the machine's memory
LOGPROB_ATOL = 1e-4  # fp32 engine vs fp32 trainer forward: ~1e-6 apart in practice
PROMPTS = ("12+7=", "What is 3+4?", "9+9=")


@rewards.register_reward("test_vllm_has_vowel")
def has_vowel(prompts, completions, **_):
    return [float(bool(set("aeiou") & set(c))) for c in completions]


@pytest.fixture(scope="module")
def model_dir(vllm_model_dir):
    return vllm_model_dir  # the one the session's vLLM server (tests/conftest.py) serves


@pytest.fixture(scope="module")
def tok(model_dir):
    return models.load_tokenizer(model_dir)


@pytest.fixture
def engine(model_dir, tok):
    from fastalign.train.generation_vllm import VLLMGenerationBackend

    backend = VLLMGenerationBackend(model_dir, eos_token_id=tok.eos_token_id, dtype=torch.float32, seed=0,
                                    max_model_len=256, kv_cache_gb=KV_CACHE_GB, enforce_eager=True)
    yield backend
    backend.close()


def _prompt_ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


def _trainer_logprobs(policy, prompts, comps, temperature=1.0) -> list[list[float]]:
    """The trainer's own log-probs of each completion token (``rollout.score_logprobs``), per row."""
    batch = rollout.build_rollout(prompts, comps, pad_token_id=0)
    scored = rollout.score_logprobs(policy, batch, temperature=temperature)
    return [scored[i][batch.response_mask[i]].tolist() for i in range(len(batch))]


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _hf_greedy(policy, tok, prompts, max_new_tokens=8):
    hf = generation.HFGenerationBackend(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return hf.generate(prompts, generation.SamplingParams(max_new_tokens=max_new_tokens, greedy=True)).token_ids


def test_sampling_params_and_logprobs(engine, model_dir, tok):
    policy = models.load_model(model_dir, dtype="float32")
    prompts = _prompt_ids(tok)
    greedy = engine.generate(prompts, generation.SamplingParams(max_new_tokens=8, greedy=True))
    assert greedy.token_ids == _hf_greedy(policy, tok, prompts)
    assert _max_gap(greedy.logprobs, _trainer_logprobs(policy, prompts, greedy)) < LOGPROB_ATOL
    # n samples per prompt, prompt-major; temperature and the sampler's log-probs at that temperature
    sampling = generation.SamplingParams(max_new_tokens=6, temperature=0.8, n=4)
    out = engine.generate(prompts, sampling)
    assert len(out.token_ids) == 12 and all(1 <= len(t) <= 6 for t in out.token_ids)
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.token_ids]
    for ids, truncated in zip(out.token_ids, out.truncated):
        assert truncated == (ids[-1] != tok.eos_token_id)
    rows = [p for p in prompts for _ in range(4)]
    assert _max_gap(out.logprobs, _trainer_logprobs(policy, rows, out, temperature=0.8)) < LOGPROB_ATOL
    assert len({tuple(t) for t in out.token_ids[:4]}) > 1  # a prompt's n samples differ
    # seeds: reproducible, and repeated prompts still differ (prompt i draws from seed + i)
    seeded = generation.SamplingParams(max_new_tokens=6, temperature=1.0, seed=5)
    first = engine.generate([prompts[0]] * 4, seeded)
    assert engine.generate([prompts[0]] * 4, seeded).token_ids == first.token_ids
    assert len({tuple(t) for t in first.token_ids}) > 1
    # top_k=1 is greedy; a stop id ends the completion (kept) and is not a truncation
    top1 = engine.generate(prompts, generation.SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1))
    assert top1.token_ids == greedy.token_ids
    ids = greedy.token_ids[0]
    engine.eos_ids = [ids[2]]
    cut = engine.generate(prompts[:1], generation.SamplingParams(max_new_tokens=8, greedy=True))
    assert cut.token_ids == [ids[:ids.index(ids[2]) + 1]] and cut.truncated == [False]


def _policy_step(policy, tok, backend, lr):
    """One clipped policy-gradient step on a rollout sampled by ``backend`` (an Adam step with a large rate, so
    the weights move visibly)."""
    torch.manual_seed(0)
    prompts = _prompt_ids(tok) * 2
    comps = backend.generate(prompts, generation.SamplingParams(max_new_tokens=6, temperature=1.0))
    batch = rollout.build_rollout(prompts, comps, pad_token_id=tok.pad_token_id)
    per_row = {"old_logprobs": rollout.score_logprobs(policy, batch), "advantages": torch.randn(len(batch))}
    loss, _ = actor.actor_loss(policy, rollout.micro_batches(batch, per_row, len(batch))[0], backend="torch")
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("lora_r", [0, 4])
def test_weight_sync_after_a_step(engine, model_dir, tok, lora_r):
    policy = models.load_model(model_dir, dtype="float32", lora_r=lora_r, lora_target_modules=["q_proj", "v_proj"])
    prompts = _prompt_ids(tok)
    greedy = generation.SamplingParams(max_new_tokens=8, greedy=True)
    _policy_step(policy, tok, engine, lr=2e-2)
    stale = engine.generate(prompts, greedy)
    assert _max_gap(stale.logprobs, _trainer_logprobs(policy, prompts, stale)) > 100 * LOGPROB_ATOL  # it moved
    engine.sync_weights(policy)
    fresh = engine.generate(prompts, greedy)
    assert fresh.token_ids == _hf_greedy(policy, tok, prompts)
    assert _max_gap(fresh.logprobs, _trainer_logprobs(policy, prompts, fresh)) < LOGPROB_ATOL


def _rl_config(cls, model_dir, out, **kw):
    base = dict(model=str(model_dir), output_dir=str(out), max_steps=3, batch_size=2, num_generations=4,
                max_new_tokens=4, learning_rate=1e-3, lr_scheduler="constant", reward_funcs=["test_vllm_has_vowel"],
                progress=False, dtype="float32", seed=0, generation_backend="vllm", vllm_kv_cache_gb=KV_CACHE_GB,
                vllm_enforce_eager=True, sampler_is_cap=2.0)
    base.update(kw)
    return cls(**base)


def test_grpo_trains_with_vllm(tmp_path, model_dir):
    result = grpo.train(_rl_config(grpo.GRPOConfig, model_dir, tmp_path / "grpo", learning_rate=3e-3))
    history = result["history"]
    assert len(history) == 3 and result["bad_steps"] == 0
    # the engine samples what the trainer's forward says at every step, so the weights followed each update
    for row in history:
        assert row["sampler_logprob_diff"] < LOGPROB_ATOL and abs(row["sampler_kl"]) < LOGPROB_ATOL
        assert row["sampler_is_weight"] == pytest.approx(1.0, abs=1e-3)
    final = models.load_model(result["final_dir"], dtype="float32")
    start = models.load_model(model_dir, dtype="float32")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(final.parameters(), start.parameters()))
    assert moved > 1e-3  # the policy changed, by far more than a stale engine would go unnoticed


def test_ppo_runs_with_vllm(tmp_path, model_dir):
    result = ppo.train(_rl_config(ppo.PPOConfig, model_dir, tmp_path / "ppo", max_steps=2, num_generations=2,
                                  kl_coef=0.05))
    assert len(result["history"]) == 2 and result["bad_steps"] == 0
    assert all(row["sampler_logprob_diff"] < LOGPROB_ATOL for row in result["history"])


# ------------------------------------------------------------------------------------------- the HTTP backend

def test_http_backend_against_a_vllm_server(vllm_server, model_dir, tok):
    server = vllm_server
    policy = models.load_model(model_dir, dtype="float32")
    backend = OpenAIGenerationBackend(server, eos_token_id=tok.eos_token_id, timeout=60, retries=1, batch_size=2)
    prompts = _prompt_ids(tok)
    greedy = backend.generate(prompts, generation.SamplingParams(max_new_tokens=8, greedy=True))
    assert backend.model == "tiny"  # asked the server
    assert greedy.token_ids == _hf_greedy(policy, tok, prompts)
    assert _max_gap(greedy.logprobs, _trainer_logprobs(policy, prompts, greedy)) < LOGPROB_ATOL
    sampling = generation.SamplingParams(max_new_tokens=6, temperature=0.8, n=3, seed=11)
    out = backend.generate(prompts, sampling)
    assert len(out.token_ids) == 9 and backend.generate(prompts, sampling).token_ids == out.token_ids
    rows = [p for p in prompts for _ in range(3)]
    assert _max_gap(out.logprobs, _trainer_logprobs(policy, rows, out, temperature=0.8)) < LOGPROB_ATOL
    for ids, truncated in zip(out.token_ids, out.truncated):
        assert truncated == (ids[-1] != tok.eos_token_id) and len(ids) <= 6
    ids = greedy.token_ids[0]
    backend.eos_ids = [ids[2]]  # a stop id ends the completion and is kept, as EOS is
    cut = backend.generate(prompts[:1], generation.SamplingParams(max_new_tokens=8, greedy=True))
    assert cut.token_ids == [ids[:ids.index(ids[2]) + 1]] and cut.truncated == [False]
    with pytest.raises(RuntimeError, match="cannot update the weights"):
        backend.sync_weights(policy)
