"""PPO: reward shaping and value alignment by hand, a short run raises the reward and fits the values, fused and
unfused runs give the same per-step losses, the KL-in-loss variant and the saved value model."""
import pytest
import torch

from fastalign.train import models, ppo

from test_grpo import VOWELS, _vowel_mass  # noqa: F401  (registers the test_has_vowel reward)


def _config(model_dir, out, **kw):
    base = dict(model=str(model_dir), output_dir=str(out), max_steps=4, batch_size=16, max_new_tokens=2,
                learning_rate=1e-2, lr_scheduler="constant", reward_funcs=["test_has_vowel"], progress=False,
                dtype="float32", seed=0, num_iterations=2, kl_coef=0.05, vf_coef=0.5,
                chat_template="on")  # the addition prompts as chat turns, as the measured prompts below
    base.update(kw)
    return ppo.PPOConfig(**base)


def test_token_rewards_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[9.0, 0.1, 0.2, 0.3, 9.0], [9.0, 9.0, 0.5, 9.0, 9.0]])
    r = ppo.token_rewards(torch.tensor([2.0, -1.0]), mask, kl, 0.5)
    # score on the last response token; -0.5 * kl on response tokens only
    expected = torch.tensor([[0.0, -0.05, -0.1, 2.0 - 0.15, 0.0], [0.0, 0.0, -1.0 - 0.25, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(ppo.token_rewards(torch.tensor([2.0, -1.0]), mask, None, 0.5),
                               torch.tensor([[0.0, 0, 0, 2, 0], [0, 0, -1, 0, 0]]))


def test_values_are_shifted_to_the_state_before_each_token(tiny_model_dir):
    value_model = models.load_model(tiny_model_dir, kind="score", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    raw = models.token_values(value_model, ids, mask)
    shifted = ppo.shifted_values(value_model, ids, mask)
    assert shifted[0, 0] == 0
    torch.testing.assert_close(shifted[:, 1:], raw[:, :-1])


def test_ppo_raises_the_reward_and_fits_values(tiny_model_dir, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}="}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for a, b in ((3, 4), (12, 30), (7, 7), (50, 1))]
    before = _vowel_mass(tiny_model_dir, tok, prompts)
    out = ppo.train(_config(tiny_model_dir, tmp_path / "run", max_steps=12))
    after = _vowel_mass(out["final_dir"], tok, prompts)
    assert after > before + 0.1, (before, after)
    h = out["history"]
    assert all(x["skipped"] == 0 for x in h)
    # the critic learns: value loss of the last rollouts below that of the first ones
    assert sum(x["value_loss"] for x in h[-4:]) < sum(x["value_loss"] for x in h[:4]), [x["value_loss"] for x in h]
    for key in ("kl", "value/clip_frac", "policy_loss", "entropy", "clip_frac", "reward/test_has_vowel"):
        assert key in h[-1], key
    assert (out["final_dir"] / "value" / "config.json").is_file()
    assert models.load_model(out["final_dir"] / "value", kind="score") is not None


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_fused_and_unfused_runs_match_step_by_step(tiny_model_dir, tmp_path, kl_in_reward):
    runs = [ppo.train(_config(tiny_model_dir, tmp_path / f"{fused}", fused=fused, max_steps=3,
                              kl_in_reward=kl_in_reward, learning_rate=1e-3))["history"]
            for fused in (True, False)]
    for a, b in zip(*runs):
        assert a["reward"] == b["reward"]
        for key in ("loss", "value_loss", "policy_loss", "grad_norm", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_reward_model_as_reward_and_value_model(tiny_model_dir, tmp_path):
    """PPO from a reward-model checkpoint: it scores the completions and initializes the critic."""
    rm = models.load_model(tiny_model_dir, kind="score", dtype="float32")
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    models.load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    out = ppo.train(_config(tiny_model_dir, tmp_path / "run", max_steps=2, reward_funcs=["none"],
                            reward_model=str(rm_dir), value_model=str(rm_dir)))
    h = out["history"]
    assert h[0]["reward"] == h[0]["reward/reward_model"] and h[0]["reward"] != 0.0
    value = models.load_model(out["final_dir"] / "value", kind="score", dtype="float32")
    assert not torch.equal(value.score.weight, rm.score.weight)  # the critic trained


def test_config_validation():
    with pytest.raises(ValueError, match="num_iterations"):
        ppo.PPOConfig(num_iterations=0)
    with pytest.raises(ValueError, match="kl_kind"):
        ppo.PPOConfig(kl_kind="k9")


@pytest.mark.parametrize("field,value,message", [
    ("gamma", 1.5, "gamma must lie in [0, 1]"), ("lam", -0.1, "lam must lie in [0, 1]"),
    ("vf_coef", -1.0, "vf_coef must be >= 0"), ("cliprange_value", 0.0, "cliprange_value must be > 0"),
])
def test_ppo_values_are_range_checked(field, value, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        ppo.PPOConfig(**{field: value})
