"""Off-policy accounting: the truncated importance-sampling correction of the actor loss against a float64
reference written out here, the sampler-vs-trainer log-prob metrics, the sampler log-probs' layout, and the
configuration errors of the generation options. Runs without vLLM."""
import copy

import pytest
import torch

from fastalign.train import actor, generation, grpo, models, rollout

CLIP_LOW, CLIP_HIGH, DUAL, T, KL_COEF, ENT_COEF = 0.05, 0.08, 3.0, 0.9, 0.1, 0.01


def _micro_batch(policy, tok):
    """A rollout with old != current (ratios clip), a reference, and sampler log-probs whose importance weights
    spread on both sides of 1 and past the cap."""
    torch.manual_seed(0)
    prompts = [tok("12+7=")["input_ids"], tok("What is 3+4?")["input_ids"], tok("9+9=")["input_ids"]] * 2
    comps = generation.HFGenerationBackend(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id) \
        .generate(prompts, generation.SamplingParams(max_new_tokens=5, temperature=T))
    batch = rollout.build_rollout(prompts, comps, pad_token_id=tok.pad_token_id)
    old = rollout.score_logprobs(policy, batch, temperature=T)
    m = batch.response_mask
    per_row = {"old_logprobs": old + 0.1 * torch.randn(old.shape) * m,
               "ref_logprobs": old + 0.1 * torch.randn(old.shape) * m,
               "sampler_logprobs": old + 0.6 * torch.randn(old.shape) * m,
               "advantages": torch.randn(len(batch))}
    return rollout.micro_batches(batch, per_row, len(batch))[0]


def _reference_loss(policy64, mb, cap, agg):
    """float64: sum over response tokens of w_t l_t with w_t = min(pi_old / pi_sampler, cap) and l_t the dual-clip
    PPO term, aggregated, plus the (unweighted) k3 KL and entropy terms."""
    ids, mask = mb["input_ids"], mb["attention_mask"]
    logits = policy64(input_ids=ids, attention_mask=mask).logits[:, :-1] / T
    labels, m = mb["labels"][:, 1:], mb["response_mask"][:, 1:].double()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * m
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    old, ref, sampler = (mb[k][:, 1:].double() for k in ("old_logprobs", "ref_logprobs", "sampler_logprobs"))
    adv = mb["advantages"].double()[:, None]
    ratio = torch.exp(logp - old)
    l = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    l = torch.where(adv < 0, torch.minimum(l, -adv * DUAL), l)
    w = torch.exp(old - sampler).clamp(max=cap)
    d = ref - logp
    kl = torch.exp(d) - d - 1

    def agg_(x):
        if agg == "token-mean":
            return (x * m).sum() / m.sum()
        return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()  # seq-mean-token-mean

    return agg_(w * l) + KL_COEF * agg_(kl) - ENT_COEF * agg_(entropy)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("fused", [True, False])
def test_truncated_is_loss_and_gradients_match_float64(tiny_model_dir, tiny_tokenizer, agg, fused):
    policy = models.load_model(tiny_model_dir, dtype="float32")
    mb = _micro_batch(policy, tiny_tokenizer)
    cap = 1.5
    w = actor.truncated_is_weights(mb["old_logprobs"], mb["sampler_logprobs"], cap)[mb["response_mask"]]
    assert (w < 0.9).any() and (w == cap).any() and ((w > 1.1) & (w < cap)).any()  # every regime is exercised
    loss, stats = actor.actor_loss(policy, mb, fused=fused, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL,
                                   agg=agg, kl_coef=KL_COEF, kl_kind="k3", entropy_coef=ENT_COEF, temperature=T,
                                   sampler_is_cap=cap, backend="torch")
    loss.backward()
    policy64 = copy.deepcopy(policy).double()
    policy64.zero_grad()
    truth = _reference_loss(policy64, mb, cap, agg)
    truth.backward()
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
    for (name, p), p64 in zip(policy.named_parameters(), policy64.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert float(stats["sampler_is_capped_frac"]) == pytest.approx(float((w == cap).float().mean()))


def test_unit_weights_leave_the_loss_unchanged(tiny_model_dir, tiny_tokenizer):
    policy = models.load_model(tiny_model_dir, dtype="float32")
    mb = _micro_batch(policy, tiny_tokenizer)
    mb["sampler_logprobs"] = mb["old_logprobs"].clone()  # the sampler is the trainer: w = 1
    opts = dict(clip_low=CLIP_LOW, dual_clip=DUAL, temperature=T, backend="torch")
    plain, _ = actor.actor_loss(policy, mb, **opts)
    weighted, stats = actor.actor_loss(policy, mb, sampler_is_cap=2.0, **opts)
    torch.testing.assert_close(weighted, plain, rtol=1e-6, atol=1e-7)
    assert float(stats["sampler_is_weight"]) == pytest.approx(1.0)
    del mb["sampler_logprobs"]
    with pytest.raises(ValueError, match="sampler_logprobs"):
        actor.actor_loss(policy, mb, sampler_is_cap=2.0, **opts)


def test_off_policy_metrics_by_hand():
    mask = torch.tensor([[False, True, True], [False, False, True]])
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, -0.5]])
    sampler = torch.tensor([[0.0, -1.5, -2.0], [0.0, 0.0, -0.25]])
    out = rollout.off_policy_metrics({"old_logprobs": old, "sampler_logprobs": sampler}, mask)
    # |delta| over the 3 response tokens: 0.5, 0, 0.25; k3 of d = old - sampler: exp(d) - d - 1
    d = torch.tensor([0.5, 0.0, -0.25], dtype=torch.float64)
    assert out["sampler_logprob_diff"] == pytest.approx(0.75 / 3)
    assert out["sampler_kl"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-5)
    assert rollout.off_policy_metrics({"old_logprobs": old}, mask) == {}


def test_sampler_logprobs_sit_in_the_label_columns():
    comps = generation.Completions([[7, 2], [5, 6, 9]], [False, True], logprobs=[[-0.1, -0.2], [-1.0, -2.0, -3.0]])
    batch = rollout.build_rollout([[4, 4, 4], [8]], comps, pad_token_id=0)
    torch.testing.assert_close(rollout.sampler_logprobs(batch, comps),
                               torch.tensor([[0, 0, 0, -0.1, -0.2], [0, -1.0, -2.0, -3.0, 0]]))
    assert rollout.sampler_logprobs(batch, generation.Completions(comps.token_ids, comps.truncated)) is None
    bad = generation.Completions(comps.token_ids, comps.truncated, logprobs=[[-0.1], [-1.0, -2.0, -3.0]])
    with pytest.raises(ValueError, match="row 0: 1 sampler log-probs for 2 tokens"):
        rollout.sampler_logprobs(batch, bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler_is_cap=2.0), "--sampler-is-cap needs the sampler's log-probs"),
    (dict(sampler_is_cap=0.0, generation_backend="vllm"), "--sampler-is-cap must be > 0"),
    (dict(generation_backend="openai"), "needs --base-url"),
    (dict(generation_backend="openai", base_url="http://127.0.0.1:1/v1"), "--allow-stale-weights"),
    (dict(base_url="http://127.0.0.1:1/v1"), "--base-url is only used by --generation-backend openai"),
    (dict(generation_backend="sglang"), "generation_backend must be one of"),
    (dict(vllm_gpu_memory_utilization=1.5), "--vllm-gpu-memory-utilization"),
    (dict(vllm_kv_cache_gb=0.0), "--vllm-kv-cache-gb"),
])
def test_generation_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo.GRPOConfig(**kwargs)
