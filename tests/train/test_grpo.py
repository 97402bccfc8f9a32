"""GRPO: the fused actor loss equals the unfused reference (every agg mode, KL, entropy), a short run raises the
reward, fused and unfused runs give the same per-step losses, and the DAPO / Dr. GRPO options run."""
import json

import pytest
import torch

from fastalign.train import actor, generation, grpo, models, rewards, rollout

VOWELS = set("aeiou")


@rewards.register_reward("test_has_vowel")
def has_vowel(prompts, completions, **_):
    """A reward a random tiny model gets about half the time with 2 tokens: a learnable, non-sparse signal."""
    return [float(bool(VOWELS & set(c))) for c in completions]


def _config(model_dir, out, **kw):
    base = dict(model=str(model_dir), output_dir=str(out), max_steps=3, batch_size=4, num_generations=8,
                max_new_tokens=2, learning_rate=1e-3, lr_scheduler="constant", reward_funcs=["test_has_vowel"],
                progress=False, dtype="float32", seed=0)
    base.update(kw)
    return grpo.GRPOConfig(**base)


def _vowel_mass(model_dir, tokenizer, prompts) -> float:
    """Exact probability that the first completion token contains a vowel, averaged over prompts: a noise-free
    measure of what the reward asks for."""
    model = models.load_model(model_dir, dtype="float32")
    vowel_ids = torch.tensor([bool(VOWELS & set(tokenizer.decode([i]))) for i in range(len(tokenizer))])
    total = 0.0
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            hidden = models.backbone_hidden(model, ids, torch.ones_like(ids))[:, -1]
            probs = torch.softmax(hidden @ models.lm_head_weight(model)[0].T, -1)[0]
        total += float(probs[vowel_ids].sum())
    return total / len(prompts)


def _rollout_micro_batch(policy, tok, agg_seed=0):
    torch.manual_seed(agg_seed)
    prompts = [tok("12+7=")["input_ids"], tok("What is 3+4?")["input_ids"], tok("9+9=")["input_ids"]]
    comps = generation.HFGenerationBackend(policy, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id) \
        .generate(prompts * 2, generation.SamplingParams(max_new_tokens=5, temperature=0.9))
    batch = rollout.build_rollout(prompts * 2, comps, pad_token_id=tok.pad_token_id)
    old = rollout.score_logprobs(policy, batch, temperature=0.9)
    noise = 0.1 * torch.randn(old.shape) * batch.response_mask  # old != current: ratios away from 1, clipping
    per_row = {"old_logprobs": old + noise, "ref_logprobs": old - noise.roll(1, 1) * batch.response_mask,
               "advantages": torch.randn(len(batch))}
    return rollout.micro_batches(batch, per_row, len(batch))[0]


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_fused_actor_loss_equals_unfused(tiny_model_dir, tiny_tokenizer, agg):
    policy = models.load_model(tiny_model_dir, dtype="float32")
    mb = _rollout_micro_batch(policy, tiny_tokenizer)
    opts = dict(clip_low=0.05, clip_high=0.08, dual_clip=3.0, agg=agg, norm_len=5, kl_coef=0.1, kl_kind="k3",
                entropy_coef=0.01, temperature=0.9, backend="torch")
    results = []
    for fused in (True, False):
        policy.zero_grad()
        loss, stats = actor.actor_loss(policy, mb, fused=fused, **opts)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (lf, sf, gf), (lu, su, gu) = results
    torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-6)
    for key in ("clip_frac", "kl", "entropy", "pg_loss", "approx_kl"):
        torch.testing.assert_close(sf[key], su[key], rtol=1e-5, atol=1e-6)
    assert float(sf["clip_frac"]) > 0  # the clip is exercised
    for name in gf:
        torch.testing.assert_close(gf[name], gu[name], rtol=1e-4, atol=1e-6)


def test_actor_loss_needs_reference_for_kl(tiny_model_dir, tiny_tokenizer):
    policy = models.load_model(tiny_model_dir, dtype="float32")
    mb = _rollout_micro_batch(policy, tiny_tokenizer)
    del mb["ref_logprobs"]
    with pytest.raises(ValueError, match="ref_logprobs"):
        actor.actor_loss(policy, mb, kl_coef=0.1)


def test_grpo_raises_the_reward(tiny_model_dir, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    # the shipped addition prompts are plain strings: tokenized as plain text, as the trainer does
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in ((3, 4), (12, 30), (7, 7), (50, 1))]
    before = _vowel_mass(tiny_model_dir, tok, prompts)
    out = grpo.train(_config(tiny_model_dir, tmp_path / "run", max_steps=8, learning_rate=1e-2))
    after = _vowel_mass(out["final_dir"], tok, prompts)
    assert after > before + 0.1, (before, after)
    history = out["history"]
    assert len(history) == 8 and all(h["skipped"] == 0 for h in history)
    first, last = sum(h["reward"] for h in history[:3]) / 3, sum(h["reward"] for h in history[-3:]) / 3
    assert last > first, [h["reward"] for h in history]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "reward/test_has_vowel", "clip_frac", "entropy", "completion_length",
                "reward_length_corr", "uniform_group_frac", "tokens_per_s"):
        assert key in logged[-1], key


def test_fused_and_unfused_runs_match_step_by_step(tiny_model_dir, tmp_path):
    runs = [grpo.train(_config(tiny_model_dir, tmp_path / f"f{fused}", fused=fused, kl_coef=0.05,
                               agg="seq-mean-token-sum-norm", scale_rewards="none"))["history"]
            for fused in (True, False)]
    assert runs[0][0]["kl"] == 0.0  # step 1: the policy is the reference
    assert runs[0][-1]["kl"] != 0.0
    for a, b in zip(*runs):
        assert a["reward"] == b["reward"]  # same samples: the updates agree closely enough to sample alike
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6)


def test_dapo_options_reuse_rollouts_and_clip(tiny_model_dir, tmp_path):
    """num_iterations=2: the second step on a rollout sees ratios away from 1 (clip-higher bounds them)."""
    out = grpo.train(_config(tiny_model_dir, tmp_path / "dapo", max_steps=4, num_iterations=2, clip_low=0.1,
                             clip_high=0.2, agg="token-mean", learning_rate=3e-3))
    h = out["history"]
    assert [round(x["ratio_max"], 6) for x in h[0::2]] == [1.0, 1.0]  # first pass over each rollout: ratio == 1
    assert all(abs(x["ratio_max"] - 1) > 1e-4 or abs(x["ratio_min"] - 1) > 1e-4 for x in h[1::2])
    assert h[0]["reward"] == h[1]["reward"]  # same rollout for both iterations


def test_lora_policy_uses_adapters_off_as_reference(tiny_model_dir, tmp_path):
    out = grpo.train(_config(tiny_model_dir, tmp_path / "lora", max_steps=3, lora_r=4, kl_coef=0.1,
                             learning_rate=1e-2))
    h = out["history"]
    assert h[0]["kl"] == 0.0 and h[-1]["kl"] != 0.0  # LoRA B starts at 0: adapters off == on, then they part
    assert (out["final_dir"] / "adapter_config.json").is_file()


def test_config_validation():
    with pytest.raises(ValueError, match="num_generations"):
        grpo.GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="agg"):
        grpo.GRPOConfig(agg="sum")
    with pytest.raises(ValueError, match="reward"):
        grpo.GRPOConfig(reward_funcs=[])


@pytest.mark.parametrize("field,value,message", [
    ("num_generations", 1, "num_generations must be >= 2"),
    ("num_iterations", 0, "num_iterations must be >= 1"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("clip_low", 1.0, "clip_low must lie in (0, 1)"),
    ("clip_high", 0.0, "clip_high must be > 0"),
    ("dual_clip", 1.0, "dual_clip must be > 1"),
    ("kl_coef", -0.1, "kl_coef must be >= 0"),
    ("entropy_coef", -0.01, "entropy_coef must be >= 0"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("top_p", 0.0, "top_p must lie in (0, 1]"),
    ("top_k", -1, "top_k must be >= 0"),
    ("reward_weights", [1.0, 2.0], "reward_weights has 2 values for 1 reward function"),
])
def test_rl_values_are_checked_before_anything_loads(field, value, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        grpo.GRPOConfig(**{field: value})
    # num_generations 1 is no group at all: every scale mode would give zero advantages
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.GRPOConfig(num_generations=1, scale_rewards="batch")


@rewards.register_reward("test_constant")
def constant(prompts, completions, **_):
    return [1.0] * len(completions)


def test_all_uniform_groups_for_k_steps_warn(tiny_model_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fastalign.train"):
        out = grpo.train(_config(tiny_model_dir, tmp_path / "run", max_steps=3, batch_size=2, num_generations=2,
                                 reward_funcs=["test_constant"], warn_uniform_groups=2))
    assert [h["uniform_group_frac"] for h in out["history"]] == [1.0, 1.0, 1.0]
    assert caplog.text.count("every group's rewards were equal for 2 steps running") == 1  # once per streak
    assert "step 2:" in caplog.text


def test_uniform_group_monitor_resets_when_a_group_differs():
    from fastalign.train import metrics

    mon = metrics.Monitors(grpo.GRPOConfig(warn_uniform_groups=2))
    fired = [mon.check(step, {"uniform_group_frac": frac}) for step, frac in enumerate([1, 1, 1, 0.5, 1, 1], 1)]
    assert [bool(f) for f in fired] == [False, True, False, False, False, True]
    assert mon.counts["uniform_group_frac"] == 3  # steps 2, 3 and 6: at or past the limit
    assert "uniform_group_frac" not in metrics.Monitors(grpo.GRPOConfig(warn_uniform_groups=None)).counts
