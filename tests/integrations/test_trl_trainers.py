"""Proof by TRL's own trainers: DPOTrainer, GRPOTrainer (a rule reward, generation with the model, no vLLM) and
SFTTrainer run a few SGD steps on the tiny model with TRL's fused head and with fastalign's
(``fastalign.integrations.trl.enabled()``), and the per-step losses, every logged metric and the final weights are
compared under the three-way rule, the truth being the same run in float64 with TRL's head. Counts (tokens,
completion lengths, steps, learning rates) must be identical. One DPO run repeats this under bf16 autocast.
"""
import math

import pytest
import torch

from helpers.accuracy import ULP, assert_close_3way, assert_close_3way_norm

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# metrics that are counts or schedules: the same in every run, to the bit
EXACT = ("learning_rate", "num_tokens", "epoch", "step", "completions/", "frac_reward_zero_std")
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")

PAIRS = {
    "prompt": ["the cat sat on", "one two three", "a a a a", "hello there", "red green", "b b b", "up and", "x y"],
    "chosen": [" the mat", " four five", " a a", " friend", " blue", " b b", " down", " z"],
    "rejected": [" a hat", " six", " b", " enemy", " black", " a", " away", " w"],
}
TEXTS = ["the cat sat on the mat", "one two three four five", "a a a a a a a", "hello there my friend",
         "red green blue", "b b b b b b", "up down left right", "x y z x y z"]
PROMPTS = ["the cat sat", "one two", "a a a", "hello"]


def distinct_characters(completions, **kwargs):
    """A rule reward that varies between completions of one prompt."""
    return [float(len(set(c))) for c in completions]


def _train(kind, model_dir, tokenizer, out_dir, *, dtype, fastalign, bf16=False):
    """Train ``kind`` for a few steps; return (per-step log entries, the final log entry, final weights)."""
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from fastalign.integrations import trl as integration

    common = dict(output_dir=str(out_dir), learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=3, bf16=bf16, fp16=False,
                  disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": dtype})
    if kind == "dpo":
        args = DPOConfig(per_device_train_batch_size=2, max_steps=3, beta=0.5, **common)
        trainer = DPOTrainer(model=str(model_dir), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict(PAIRS))
    elif kind == "grpo":
        args = GRPOConfig(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, max_steps=2,
                          beta=0.04, **common)
        trainer = GRPOTrainer(model=str(model_dir), reward_funcs=distinct_characters, args=args,
                              processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    else:
        args = SFTConfig(per_device_train_batch_size=2, max_steps=3, max_length=32, **common)
        trainer = SFTTrainer(model=str(model_dir), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    if fastalign:
        with integration.enabled():
            trainer.train()
    else:
        trainer.train()
    logs = trainer.state.log_history
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return [entry for entry in logs if "loss" in entry], logs[-1], weights


def _scalar_close(mine, theirs, truth, dtype, name):
    """The three-way rule for one logged number; its floor is one ulp of the dtype per unit of |truth| on top of the
    absolute one, as the number is a sum or mean of many per-token values rounded in the dtype."""
    tensor = lambda x: torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype] + 4 * ULP[dtype] * abs(float(truth))
    assert_close_3way(tensor(mine), tensor(theirs), tensor(truth), dtype, name=name, atol=atol)


def _compare(truth, theirs, mine, dtype):
    (t_steps, t_end, t_weights), (s_steps, s_end, s_weights), (m_steps, m_end, m_weights) = truth, theirs, mine
    assert len(m_steps) == len(s_steps) == len(t_steps) > 1
    for step, (t, s, m) in enumerate(zip(t_steps, s_steps, m_steps)):
        assert m.keys() == s.keys() == t.keys()
        for key in t:
            if key.startswith(TIMING):
                continue
            if key.startswith(EXACT):
                assert m[key] == s[key] == t[key], (step, key)
            elif math.isfinite(t[key]):
                _scalar_close(m[key], s[key], t[key], dtype, name=f"step {step} {key}")
    _scalar_close(m_end["train_loss"], s_end["train_loss"], t_end["train_loss"], dtype, name="train_loss")
    moved = 0
    for name, value in t_weights.items():
        assert_close_3way_norm(m_weights[name], s_weights[name], value, dtype, name=name)
        moved += int(not torch.equal(s_weights[name], m_weights[name]))
    assert moved  # the two heads do differ in rounding: the comparison is not of one run with itself


@pytest.mark.parametrize("kind", ["dpo", "grpo", "sft"])
def test_trainer_with_fastalign_matches_trl(kind, tiny_dir, tiny_tokenizer, tmp_path, trl_restored):
    runs = [_train(kind, tiny_dir, tiny_tokenizer, tmp_path / name, dtype=dtype, fastalign=on)
            for name, dtype, on in (("truth", torch.float64, False), ("trl", torch.float32, False),
                                    ("fastalign", torch.float32, True))]
    _compare(*runs, torch.float32)
    steps = runs[2][0]
    assert steps[-1]["loss"] != steps[0]["loss"]  # training moved the model
    if kind == "sft":
        assert any(entry["mean_token_accuracy"] > 0 for entry in steps)  # is_top1 is not always False
    if kind == "grpo":
        assert any(entry["reward_std"] > 0 for entry in steps)  # the advantages are not all zero


def test_dpo_under_bf16_autocast(tiny_dir, tiny_tokenizer, tmp_path, trl_restored):
    """fp32 master weights, bf16 autocast (TrainingArguments(bf16=True)): both heads compute in bf16."""
    runs = [_train("dpo", tiny_dir, tiny_tokenizer, tmp_path / name, dtype=dtype, fastalign=on, bf16=bf16)
            for name, dtype, on, bf16 in (("truth", torch.float64, False, False), ("trl", torch.float32, False, True),
                                          ("fastalign", torch.float32, True, True))]
    _compare(*runs, torch.bfloat16)
