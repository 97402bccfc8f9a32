"""Data loading, validation errors with file:line, tokenization masks, collators, the resumable sampler."""
import copy
import json
import logging

import pytest

from fastalign.train import data as D
from fastalign.train import batching as B


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
        if row["messages"] is not None:  # language modelling (conversational): the whole templated conversation
            assert trained == e["input_ids"] == tiny_tokenizer.apply_chat_template(row["messages"])["input_ids"]
            continue
        # prompt-completion (standard): plain text, the completion and EOS trained
        assert tiny_tokenizer.decode(e["input_ids"]) == row["prompt"] + row["completion"] + tiny_tokenizer.eos_token
        assert tiny_tokenizer.decode(trained).startswith(row["completion"] + tiny_tokenizer.eos_token)
        assert e["labels"][: len(e["labels"]) - len(trained)] == [D.IGNORE] * (len(e["labels"]) - len(trained))


MSG = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("lines,kind,match", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"'], "sft", r"bad\.jsonl:line 2: invalid JSON"),
    (['{"prompt": "a", "completion": "b"}', '', '{"prompt": "a"}'], "sft", r"line 3: missing field 'completion'"),
    (['{"prompt": "a", "chosen": "b", "rejected": 3}'], "preference", r"line 1: field 'rejected' must be a string"),
    (['[1, 2]'], "rl", r"line 1: expected a JSON object"),
    (['{"answer": "x"}'], "sft", r"line 1: an SFT row needs 'text', 'messages', or 'prompt' and 'completion'"),
    (['{"text": "x", "prompt": "a", "completion": "b"}'], "sft", r"line 1: fields \['text', 'prompt', 'completion'\] mix"),
    (['{"text": ["x"]}'], "sft", r"line 1: field 'text' must be a string, got list"),
    ([json.dumps({"prompt": "q", "completion": MSG[1:]})], "sft",
     r"line 1: \['prompt'\] is a string but \['completion'\] is a message list"),
    ([json.dumps({"prompt": "q", "chosen": MSG, "rejected": MSG})], "preference",
     r"line 1: .*drop 'prompt' \(the implicit prompt\)"),
    (['{"prompt": "q", "completion": "a", "label": true}'], "preference",
     r"line 1: an unpaired preference row .*no fastalign trainer trains on unpaired rows"),
    (['{"chosen": "Yes.", "rejected": "No."}'], "preference", r"line 1: 'chosen' and 'rejected' share no prefix"),
    ([json.dumps({"messages": MSG, "tools": [{"name": "f"}]})], "sft", r"line 1: a per-row 'tools' field"),
    (['{"prompt": "a", "completion": "b"}', json.dumps({"prompt": MSG[:1], "completion": MSG[1:]})], "sft",
     r"bad\.jsonl:line 2: field 'prompt' is a message list here but str at .*bad\.jsonl:line 1"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, kind, match):
    with pytest.raises(D.DataError, match=match):
        D.load_rows(_write(tmp_path / "bad.jsonl", lines), kind)


def test_chat_template_mode_errors_name_the_line(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "What is 1 + 2?", "completion": "3"}',
                                         json.dumps({"messages": MSG})])
    # off: the conversational row is refused, naming its line, without claiming the tokenizer lacks a template
    with pytest.raises(D.DataError, match=r"d\.jsonl:line 2 is conversational .*chat_template='off'") as err:
        D.load_rows(path, "sft", tokenizer=tiny_tokenizer, chat_template="off")
    assert "has none" not in str(err.value)
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(D.DataError, match=r"d\.jsonl:line 2 is conversational .*the tokenizer has none"):
        D.load_rows(path, "sft", tokenizer=bare)
    with pytest.raises(D.DataError, match=r"d\.jsonl:line 1 is to be wrapped \(chat_template='on'\)"):
        D.load_rows(path, "sft", tokenizer=bare, chat_template="on")
    rows = D.load_rows(path.parent / _write(tmp_path / "s.jsonl", ['{"text": "plain"}']).name, "sft", tokenizer=bare)
    assert D.tokenize_sft(rows, bare, max_length=32, max_prompt_length=32)[0]["input_ids"]  # text needs no template


def test_chat_template_modes_tokenize_as_documented(tiny_tokenizer):
    tok = tiny_tokenizer
    row = {"prompt": "What is 1 + 2?", "completion": "3", "messages": None, "text": None}
    (auto,) = D.tokenize_sft([row], tok, max_length=64, max_prompt_length=64)
    (on,) = D.tokenize_sft([row], tok, max_length=64, max_prompt_length=64, chat_template="on")
    assert auto["input_ids"] == tok("What is 1 + 2?3" + tok.eos_token)["input_ids"]  # auto: plain text, as TRL
    chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": "3"}]
    assert on["input_ids"] == tok.apply_chat_template(chat)["input_ids"]  # on: as the same conversation
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True)["input_ids"]
    assert on["labels"] == [D.IGNORE] * len(prompt) + on["input_ids"][len(prompt):]


@pytest.mark.parametrize("chosen,rejected,want", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # the space goes with the answer
    ("ab1", "ab2", ("ab", "1", "2")),
    ("abc", "abcd", ("ab", "c", "cd")),  # a prefix of the other: TRL leaves the last shared element to both
    (MSG, MSG[:1] + [{"role": "assistant", "content": "b"}], (MSG[:1], MSG[1:], [{"role": "assistant", "content": "b"}])),
])
def test_extract_prompt_follows_trl(chosen, rejected, want):
    from trl.data_utils import extract_prompt as trl_extract

    assert D.extract_prompt(chosen, rejected) == want
    got = trl_extract({"chosen": chosen, "rejected": rejected})
    assert (got["prompt"], got["chosen"], got["rejected"]) == want


def test_mixed_files_are_handled_row_by_row(tmp_path, tiny_tokenizer):
    # explicit and implicit prompts in one preference file; standard and conversational rows in one SFT file
    pref = _write(tmp_path / "p.jsonl", ['{"prompt": "Q?", "chosen": " yes", "rejected": " no"}',
                                         '{"chosen": "Q? yes", "rejected": "Q? no"}'])
    a, b = D.tokenize_preference(D.load_rows(pref, "preference"), tiny_tokenizer, max_length=64,
                                 max_prompt_length=64)
    assert a == b  # the same pair, written both ways
    sft = _write(tmp_path / "s.jsonl", ['{"text": "Some text."}', '{"prompt": "Q?", "completion": " A."}',
                                        json.dumps({"messages": MSG})])
    ex = D.tokenize_sft(D.load_rows(sft, "sft"), tiny_tokenizer, max_length=64, max_prompt_length=64)
    assert [sum(lab != D.IGNORE for lab in e["labels"]) == len(e["labels"]) for e in ex] == [True, False, True]


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
    batch = B.collate_preference(pe[:3], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, key in enumerate(["chosen_ids"] * 3 + ["rejected_ids"] * 3):
        e = pe[i % 3]
        trained = batch["labels"][i][batch["labels"][i] != D.IGNORE].tolist()
        assert trained == e[key] and batch["attention_mask"][i].sum() == len(e["prompt_ids"]) + len(e[key])
    path = _write(tmp_path / "rl.jsonl", [json.dumps({"prompt": "What is 2 + 2?", "answer": "4", "id": 7})])
    (p,) = D.tokenize_prompts(D.load_rows(path, "rl"), tiny_tokenizer, max_prompt_length=32)
    assert p["answer"] == "4" and p["id"] == 7 and p["prompt_text"] == "What is 2 + 2?"  # standard: plain text
    (q,) = D.tokenize_prompts(D.load_rows(path, "rl"), tiny_tokenizer, max_prompt_length=32, chat_template="on")
    assert q["prompt_text"].endswith("<|assistant|>\n") and q["prompt_ids"] != p["prompt_ids"]
    left = B.collate_prompts([p, {**p, "prompt_ids": p["prompt_ids"][:3]}], tiny_tokenizer.pad_token_id)
    assert left["attention_mask"][1, -3:].tolist() == [1, 1, 1] and left["attention_mask"][1, 0] == 0


def test_packing_keeps_masks():
    ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    packed = B.pack_sft(ex, 4)
    assert packed == [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, -100]},
                      {"input_ids": [5], "labels": [5]}]
    batch = B.collate_sft(packed, 0)
    assert batch["labels"][1].tolist() == [5, -100, -100, -100] and batch["attention_mask"].sum() == 5


def test_sampler_resume_and_sharding():
    one = B.Sampler(10, 4, seed=3)
    seen = [one.next() for _ in range(5)]
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # an epoch is a permutation
    again = B.Sampler(10, 4, seed=3)
    again.next(), again.next()
    resumed = B.Sampler(10, 4, seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next() for _ in range(3)] == seen[2:]
    ranks = [B.Sampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        assert ranks[0].next() + ranks[1].next() == seen[step]
