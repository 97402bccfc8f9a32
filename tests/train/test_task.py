"""The shipped addition task: files equal a fresh deterministic generation, splits are disjoint and correct,
they load through the trainer's data loaders, and the accuracy evaluator scores exact matches."""
import json

import pytest

from fastalign.train import data, generation, models, task


def test_shipped_files_are_the_default_generation(tmp_path):
    fresh = task.write_task_files(tmp_path)
    for name, path in data.demo_files().items():
        assert path.read_bytes() == fresh[name].read_bytes(), f"{path} differs from write_task_files output"


def test_splits_are_disjoint_and_correct():
    splits = task.make_splits()
    sizes = task.AdditionTask()
    assert [len(splits[s]) for s in task.SPLITS] == [sizes.n_heldout, sizes.n_sft, sizes.n_preference, sizes.n_rl]
    seen = set()
    for name, rows in splits.items():
        prompts = {r["prompt"] for r in rows}
        assert len(prompts) == len(rows) and not prompts & seen, name
        seen |= prompts
        for r in rows:
            a, b = map(int, r["prompt"].rstrip("=").split("+"))
            truth = str(a + b)
            if name == "sft":
                assert r["completion"] == truth
            elif name == "preference":
                assert r["chosen"] == truth and r["rejected"] != truth and int(r["rejected"]) >= 0
            else:
                assert r["answer"] == truth
    assert task.make_splits() == splits  # deterministic
    assert task.make_splits(task.AdditionTask(seed=1))["heldout"] != splits["heldout"]


def test_too_many_problems_is_an_error():
    with pytest.raises(ValueError, match="distinct problems"):
        task.AdditionTask(max_operand=9, n_sft=100)


def test_files_load_through_the_trainer_loaders(tiny_tokenizer):
    files = data.demo_files()
    kinds = {"sft": "sft", "preference": "preference", "rl": "rl", "heldout": "rl"}
    for name, kind in kinds.items():
        rows = data.load_rows(files[name], kind)
        assert len(rows) == sum(1 for _ in open(files[name]))
    prompts = data.tokenize_prompts(data.load_rows(files["rl"], "rl", max_samples=3), tiny_tokenizer,
                                    max_prompt_length=64)
    assert {"prompt_ids", "answer", "prompt"} <= set(prompts[0])
    # digits are single tokens, so the answer is as easy to emit as the tokenizer allows
    assert tiny_tokenizer("1234", add_special_tokens=False)["input_ids"].__len__() == 4


class _Oracle:
    """A generation backend that answers the first ``k`` prompts right and the rest wrong."""

    def __init__(self, tokenizer, rows, k):
        self.tok, self.rows, self.k = tokenizer, rows, k

    def generate(self, prompt_ids, sampling):
        assert sampling.greedy
        out = generation.Completions([], [])
        for i, r in enumerate(self.rows):
            text = r["answer"] if i < self.k else str(int(r["answer"]) + 1)
            out.token_ids.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
            out.truncated.append(False)
        return out

    def sync_weights(self, model):
        pass


def test_accuracy_is_exact_match(tiny_model_dir, tiny_tokenizer):
    rows = [json.loads(line) for line in data.demo_files()["heldout"].read_text().splitlines()[:20]]
    oracle = _Oracle(tiny_tokenizer, rows, 15)
    assert task.evaluate_accuracy(None, tiny_tokenizer, rows, backend=oracle) == pytest.approx(0.75)
    model = models.load_model(tiny_model_dir, dtype="float32")  # random init: it cannot add
    assert task.evaluate_accuracy(model, tiny_tokenizer, rows, max_new_tokens=4) == 0.0
