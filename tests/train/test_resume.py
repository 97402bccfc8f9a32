"""An interrupted and resumed run equals an uninterrupted one bit for bit (weights, losses, data order)."""
import pytest
import torch
from safetensors.torch import load_file

from fastalign.train import dpo, metrics, sft
from fastalign.train.config import DPOConfig, SFTConfig


class Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch, step):
    original = metrics.MetricsLogger.log

    def log(self, s, values):
        if s == step:
            raise Interrupt(f"killed at step {s}")
        original(self, s, values)

    monkeypatch.setattr(metrics.MetricsLogger, "log", log)


def _weights(run):
    final = run["final_dir"]
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(final / name))


@pytest.mark.parametrize("algo,cls,lora_r", [(sft, SFTConfig, 0), (dpo, DPOConfig, 0), (sft, SFTConfig, 4)])
def test_resume_is_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch, algo, cls, lora_r):
    # shuffled data over several epochs, a warmup + cosine schedule, Adam moments: everything must be restored
    kw = dict(model=str(tiny_model_dir), max_steps=6, batch_size=3, max_samples=7, learning_rate=2e-3,
              warmup_steps=2, save_steps=2, max_length=64, progress=False, dtype="float32", seed=1, lora_r=lora_r)
    full = algo.train(cls(output_dir=str(tmp_path / "full"), **kw))
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)  # dies after the step-4 checkpoint, in the middle of step 5's bookkeeping
        with pytest.raises(Interrupt):
            algo.train(cls(output_dir=str(tmp_path / "cut"), **kw))
    resumed = algo.train(cls(output_dir=str(tmp_path / "cut"), resume=True, **kw))
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][4:]]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics.read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics.read_metrics(tmp_path / "full")]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_resume_inside_a_rollout_is_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch, algo):
    """num_iterations=2: steps 3 and 4 share a rollout, and the step-3 checkpoint falls between them. The resumed
    run must take step 4 on that same rollout (not sample a new one), then sample step 5's as the full run did."""
    from fastalign.train import grpo, ppo

    import test_grpo  # noqa: F401  (registers test_has_vowel: a reward that differs between completions)

    module = {"grpo": grpo, "ppo": ppo}[algo]
    cls = {"grpo": grpo.GRPOConfig, "ppo": ppo.PPOConfig}[algo]
    kw = dict(model=str(tiny_model_dir), max_steps=5, batch_size=2, num_generations=4, max_new_tokens=3,
              num_iterations=2, save_steps=3, learning_rate=3e-3, reward_funcs=["test_has_vowel"], progress=False,
              dtype="float32", seed=1, kl_coef=0.05)
    full = module.train(cls(output_dir=str(tmp_path / "full"), **kw))
    rewards = [h["reward"] for h in full["history"]]
    assert rewards[2] == rewards[3] and len(set(rewards)) > 1  # one rollout for steps 3-4; the reward varies
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        with pytest.raises(Interrupt):
            module.train(cls(output_dir=str(tmp_path / "cut"), **kw))
    resumed = module.train(cls(output_dir=str(tmp_path / "cut"), resume=True, **kw))
    assert [h["step"] for h in resumed["history"]] == [4, 5]
    for key in ("loss", "reward", "grad_norm", "ratio_max"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in full["history"][3:]], key
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if algo == "ppo":
        a, b = (load_file(str(r["final_dir"] / "value" / "model.safetensors")) for r in (full, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)
