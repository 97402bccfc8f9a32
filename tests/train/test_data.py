"""Data loading, validation errors with file:line, tokenization masks, collators, the resumable sampler."""
import json
import logging

import pytest

from fastalign.train import data as D


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_shipped_sft_keeps_both_formats(tiny_tokenizer, caplog):
    rows = D.load_rows(None, "sft")
    assert len(rows) == 64 and sum(r["messages"] is not None for r in rows) == 16
    with caplog.at_level(logging.INFO, logger="fastalign.train"):
        ex = D.tokenize_sft(rows, tiny_tokenizer, max_length=64, max_prompt_length=32)
    assert len(ex) == 64 and "64 rows" in caplog.text
    for e, row in zip(ex, rows):
        trained = [t for t, lab in zip(e["input_ids"], e["labels"]) if lab != D.IGNORE]
        answer = row["completion"] if row["completion"] is not None else row["messages"][-1]["content"]
        assert tiny_tokenizer.decode(trained).startswith(answer + tiny_tokenizer.eos_token)
        assert e["labels"][: len(e["labels"]) - len(trained)] == [D.IGNORE] * (len(e["labels"]) - len(trained))


@pytest.mark.parametrize("lines,kind,match", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"'], "sft", r"bad\.jsonl:line 2: invalid JSON"),
    (['{"prompt": "a", "completion": "b"}', '', '{"prompt": "a"}'], "sft", r"line 3: missing field 'completion'"),
    (['{"prompt": "a", "chosen": "b", "rejected": 3}'], "preference", r"line 1: field 'rejected' must be a string"),
    (['{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}'], "sft",
     r"line 1: the last message must be the assistant's"),
    (['[1, 2]'], "rl", r"line 1: expected a JSON object"),
    (['{"text": "x"}'], "sft", r"line 1: an SFT row needs"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, kind, match):
    with pytest.raises(D.DataError, match=match):
        D.load_rows(_write(tmp_path / "bad.jsonl", lines), kind)


def test_missing_file_and_parquet(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_rows(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(D.DataError, match="is a directory"):
        D.load_rows(tmp_path, "sft")
    from datasets import Dataset

    Dataset.from_list([{"prompt": "p", "answer": "4"}, {"prompt": None, "answer": "5"}]).to_parquet(
        str(tmp_path / "rl.parquet"))
    with pytest.raises(D.DataError, match=r"rl\.parquet:row 1: missing field 'prompt'"):
        D.load_rows(tmp_path / "rl.parquet", "rl")


def test_truncation_and_drops_are_counted(tmp_path, tiny_tokenizer, caplog):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "What is 1 + 2?" * 20, "completion": "3"}),
                                        json.dumps({"prompt": "Hi", "completion": "a long answer " * 20})])
    with caplog.at_level(logging.INFO, logger="fastalign.train"):
        ex = D.tokenize_sft(D.load_rows(path, "sft"), tiny_tokenizer, max_length=40, max_prompt_length=40,
                            chat_template="off")
    assert len(ex) == 1 and len(ex[0]["input_ids"]) == 40
    assert "1 prompts truncated, 1 completions truncated, 1 rows dropped" in caplog.text


def test_preference_collate_and_rl_extras(tmp_path, tiny_tokenizer):
    pe = D.tokenize_preference(D.load_rows(None, "preference"), tiny_tokenizer, max_length=64, max_prompt_length=32)
    batch = D.collate_preference(pe[:3], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, key in enumerate(["chosen_ids"] * 3 + ["rejected_ids"] * 3):
        e = pe[i % 3]
        trained = batch["labels"][i][batch["labels"][i] != D.IGNORE].tolist()
        assert trained == e[key] and batch["attention_mask"][i].sum() == len(e["prompt_ids"]) + len(e[key])
    path = _write(tmp_path / "rl.jsonl", [json.dumps({"prompt": "What is 2 + 2?", "answer": "4", "id": 7})])
    (p,) = D.tokenize_prompts(D.load_rows(path, "rl"), tiny_tokenizer, max_prompt_length=32)
    assert p["answer"] == "4" and p["id"] == 7 and p["prompt_text"].endswith("<|assistant|>\n")
    left = D.collate_prompts([p, {**p, "prompt_ids": p["prompt_ids"][:3]}], tiny_tokenizer.pad_token_id)
    assert left["attention_mask"][1, -3:].tolist() == [1, 1, 1] and left["attention_mask"][1, 0] == 0


def test_packing_keeps_masks():
    ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    packed = D.pack_sft(ex, 4)
    assert packed == [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, -100]},
                      {"input_ids": [5], "labels": [5]}]
    batch = D.collate_sft(packed, 0)
    assert batch["labels"][1].tolist() == [5, -100, -100, -100] and batch["attention_mask"].sum() == 5


def test_sampler_resume_and_sharding():
    one = D.Sampler(10, 4, seed=3)
    seen = [one.next() for _ in range(5)]
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # an epoch is a permutation
    again = D.Sampler(10, 4, seed=3)
    again.next(), again.next()
    resumed = D.Sampler(10, 4, seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next() for _ in range(3)] == seen[2:]
    ranks = [D.Sampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        assert ranks[0].next() + ranks[1].next() == seen[step]
