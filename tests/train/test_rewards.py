"""Reward functions: rule-based checks, the registry, dataset fields, weighted sums."""
import os
import re
import sys

import pytest
import torch

from fastalign.train import rewards


def test_exact_match_uses_the_answer_field_and_ignores_whitespace():
    out = rewards.exact_match(["1+2=", "3+4=", "5+5=", "9+9="], ["3", "8", " 1 0", "18x"],
                              answer=["3", "7", "10", "18"])
    assert out == [1.0, 0.0, 1.0, 0.0]


def test_exact_match_names_a_missing_field():
    with pytest.raises(KeyError, match="answer"):
        rewards.exact_match(["1+2="], ["3"], solution=["3"])


def test_format_reward_wants_a_bare_integer_that_ended():
    out = rewards.integer_format(["p"] * 5, ["12", "-3", "12 apples", "", "7"],
                                 truncated=[False, False, False, False, True])
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rewards.integer_format(["p"], ["4"]) == [1.0]  # no truncation info: judged on text alone


def test_numeric_closeness_is_dense():
    out = rewards.numeric_closeness(["p"] * 3, ["10", "12", "ten"], answer=["10", "10", "10"])
    assert out == [1.0, pytest.approx(1 / 3), 0.0]


def test_registry_and_import_paths():
    assert rewards.get_reward("exact_match") is rewards.exact_match
    assert rewards.get_reward("fastalign.train.rewards:numeric_closeness") is rewards.numeric_closeness
    with pytest.raises(ValueError, match="unknown reward function 'nope'.*exact_match"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.get_reward("fastalign.train.rewards:nope")

    @rewards.register_reward("test_len")
    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    try:
        assert rewards.get_reward("test_len") is length
        with pytest.raises(ValueError, match="already registered"):
            rewards.register_reward("test_len")(lambda p, c, **_: [])
    finally:
        del rewards.REWARD_FUNCTIONS["test_len"]


def test_import_path_finds_modules_in_the_current_directory(tmp_path, monkeypatch):
    # the `fastalign` console script does not put the current directory on sys.path; `python -m` does
    (tmp_path / "my_rewards_cwd.py").write_text("def short(prompts, completions, **_):\n"
                                                "    return [1.0 for _ in completions]\n")
    (tmp_path / "my_rewards_broken.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    for mod in ("my_rewards_cwd", "my_rewards_broken"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    fn = rewards.get_reward("my_rewards_cwd:short")
    assert fn(["p"], ["c"]) == [1.0] and sys.path[0] == str(tmp_path)
    with pytest.raises(ValueError, match=r"no module named 'nowhere_xyz' in the current directory .*"
                                         + re.escape(str(tmp_path)) + r" nor on sys.path \("):
        rewards.get_reward("nowhere_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'long'"):
        rewards.get_reward("my_rewards_cwd:long")
    # a module that is found but fails to import says what failed, not where it looked
    with pytest.raises(ValueError, match="No module named 'not_a_real_dependency_xyz'"):
        rewards.get_reward("my_rewards_broken:fn")


def test_weighted_sum_passes_extra_fields_and_returns_parts():
    seen = {}

    def spy(prompts, completions, *, difficulty, answer, **rest):
        seen.update(difficulty=difficulty, rest=sorted(rest))
        return [0.5 * d for d in difficulty]

    combined = rewards.Rewards([("exact_match", rewards.exact_match, 1.0), ("spy", spy, 2.0)])
    total, parts = combined(["1+1=", "2+2="], ["2", "5"],
                            {"answer": ["2", "4"], "difficulty": [1, 3], "truncated": [False, False]})
    assert seen == {"difficulty": [1, 3], "rest": ["truncated"]}
    torch.testing.assert_close(parts["exact_match"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(parts["spy"], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(total, torch.tensor([1.0 + 1.0, 0.0 + 3.0]))


def test_bad_reward_outputs_raise():
    short = rewards.Rewards([("short", lambda p, c, **_: [1.0], 1.0)])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        short(["a", "b"], ["x", "y"])
    nan = rewards.Rewards([("nan", lambda p, c, **_: [float("nan")] * len(c), 1.0)])
    with pytest.raises(ValueError, match="non-finite"):
        nan(["a"], ["x"])


def test_build_rewards_checks_weights():
    built = rewards.build_rewards(["exact_match", "format"], [1.0, 0.1])
    assert [(n, w) for n, _, w in built.fns] == [("exact_match", 1.0), ("format", 0.1)]
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        rewards.build_rewards(["exact_match"], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        rewards.build_rewards([])
    with pytest.raises(ValueError, match="at least one"):  # what `--reward-funcs none` (or '') parses to
        rewards.build_rewards(["none"])
    assert [n for n, _, _ in rewards.build_rewards(["", "exact_match"]).fns] == ["exact_match"]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A reward-model checkpoint as `fastalign train rm` writes it: the tiny model with a scalar head."""
    from fastalign.train import models

    torch.manual_seed(0)
    rm = models.load_model(tiny_model_dir, kind="score", dtype="float32")
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # a head that separates texts (the fresh init is ~0)
    out = tmp_path_factory.mktemp("rm") / "final"
    rm.save_pretrained(out)
    models.load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def test_reward_model_scores_like_the_rm_trainer_tokenizes(reward_model_dir):
    from fastalign.train import data, models

    scorer = rewards.RewardModelScorer(str(reward_model_dir), batch_size=2)
    prompts, completions = ["1+2=", "3+4=", "3+4="], ["3", "7", "8"]
    scores = scorer(prompts, completions)
    assert len(scores) == 3 and len(set(scores)) == 3
    # the same sequences as data.tokenize_preference builds for RM training, scored one at a time
    tok = models.load_tokenizer(reward_model_dir)
    rows = [{"prompt": p, "chosen": c, "rejected": c} for p, c in zip(prompts, completions)]
    examples = data.tokenize_preference(rows, tok, max_length=64, max_prompt_length=48)
    model = models.load_model(reward_model_dir, kind="score", dtype="float32")
    for e, s in zip(examples, scores):
        ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"]])
        with torch.no_grad():
            expected = models.sequence_scores(model, ids, torch.ones_like(ids))
        assert s == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_grpo_trains_on_a_reward_model_alone(reward_model_dir, tiny_model_dir, tmp_path):
    from fastalign.train import grpo

    out = grpo.train(grpo.GRPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path), max_steps=2, batch_size=2,
                                     num_generations=4, max_new_tokens=3, reward_funcs=[],
                                     reward_model=str(reward_model_dir), progress=False, dtype="float32"))
    h = out["history"]
    assert len(h) == 2 and "reward/reward_model" in h[-1] and h[-1]["reward"] == h[-1]["reward/reward_model"]
    assert h[0]["reward_std"] > 0  # the model's scores differ between completions: a signal to learn from
